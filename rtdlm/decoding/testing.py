"""Deterministic fake models for tests and examples (like gemma's `testing` module)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class MarkovModel:
    """A first-order Markov "language model": next-token logits = `table[current token]`.

    The cache is a position-indexed array of the tokens written so far, `[B, max_length]`,
    so positions, rollback and ragged rows behave as with a real KV cache. With
    `exit_tables` ([E, V, V]), `exit_layer=e < num_layers` reads `exit_tables[e - 1]`
    instead: a cheap stand-in for early exit.
    """

    table: jax.Array  # [V, V]
    exit_tables: jax.Array | None = None  # [num_layers - 1, V, V]
    num_layers: int = struct.field(pytree_node=False, default=1)

    @property
    def vocab_size(self) -> int:
        return self.table.shape[-1]

    def init_cache(self, batch_size: int, max_length: int) -> jax.Array:
        return jnp.full((batch_size, max_length), -1, jnp.int32)

    def __call__(self, tokens, positions, cache, exit_layer=None):
        rows = jnp.arange(tokens.shape[0])[:, None]
        cache = cache.at[rows, positions].set(tokens, mode="drop")
        table = self.table
        if exit_layer is not None and exit_layer < self.num_layers:
            table = self.exit_tables[exit_layer - 1]
        return table[tokens], cache  # [B, T, V]


@struct.dataclass
class WideCacheModel:
    """A MarkovModel with a float cache as large as a real model's, [B, max_length, 1024],
    written and read at every call: shows whether a decode loop copies its cache."""

    inner: MarkovModel

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def init_cache(self, batch_size: int, max_length: int):
        return self.inner.init_cache(batch_size, max_length), jnp.zeros((batch_size, max_length, 1024))

    def __call__(self, tokens, positions, cache):
        tokens_cache, wide = cache
        logits, tokens_cache = self.inner(tokens, positions, tokens_cache)
        rows = jnp.arange(tokens.shape[0])[:, None]
        wide = wide.at[rows, positions, 0].set(tokens, mode="drop")
        zeros = wide[rows, positions, 1:2]  # never written: read so that the cache is live
        return logits + zeros, (tokens_cache, wide)


def random_markov_model(
    vocab_size: int, seed: int = 0, scale: float = 2.0, num_layers: int = 1
) -> MarkovModel:
    """A MarkovModel with Gaussian logits; exits get noisier versions of the final table."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(vocab_size, vocab_size)).astype(np.float32) * scale
    exits = None
    if num_layers > 1:
        noise = rng.normal(size=(num_layers - 1, vocab_size, vocab_size)).astype(np.float32)
        weights = np.linspace(1.0, 0.2, num_layers - 1, dtype=np.float32)[:, None, None]
        exits = jnp.asarray(table[None] + scale * weights * noise)
    return MarkovModel(jnp.asarray(table), exits, num_layers)
