"""Reductions along each row's vocabulary, which may be sharded over a mesh axis.

Inside `shard_map` with the vocabulary split over `axis_name`, a device holds `[B, V/n]`
logits; these helpers reduce that block and combine per-row scalars (or small per-row
vectors such as candidate sets and histograms) across devices, so no `[B, V]` array ever
crosses devices. With `axis_name=None` they are plain local reductions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Vocab(NamedTuple):
    """How a row's vocabulary is laid out: local, or split evenly over mesh axis `axis_name`."""

    axis_name: str | None = None

    @property
    def sharded(self) -> bool:
        return self.axis_name is not None

    def size(self, local: int) -> int:
        """The whole vocabulary size from the local block's."""
        return local * lax.axis_size(self.axis_name) if self.sharded else local

    def offset(self, local: int) -> jax.Array | int:
        """Token id of this device's first vocabulary entry."""
        return lax.axis_index(self.axis_name) * local if self.sharded else 0

    def token_ids(self, local: int) -> jax.Array:
        """[local] global token ids of this device's vocabulary block."""
        return jnp.arange(local) + self.offset(local)

    def sum(self, x: jax.Array) -> jax.Array:
        """[B, V] -> [B] row sums over the whole vocabulary."""
        return self.combine_sum(jnp.sum(x, axis=-1))

    def max(self, x: jax.Array) -> jax.Array:
        out = jnp.max(x, axis=-1)
        return lax.pmax(out, self.axis_name) if self.sharded else out

    def min(self, x: jax.Array) -> jax.Array:
        out = jnp.min(x, axis=-1)
        return lax.pmin(out, self.axis_name) if self.sharded else out

    def combine_sum(self, partial: jax.Array) -> jax.Array:
        """Adds per-device partial results (any shape) over the vocabulary axis."""
        return lax.psum(partial, self.axis_name) if self.sharded else partial

    def gather(self, x: jax.Array) -> jax.Array:
        """[B, n] per device -> [B, n * devices], concatenated in device order."""
        return lax.all_gather(x, self.axis_name, axis=x.ndim - 1, tiled=True) if self.sharded else x


LOCAL = Vocab()
