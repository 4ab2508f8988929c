"""The model contract the decode loops drive, and an adapter for Flax Linen modules.

A model is any PyTree (a `flax.struct.dataclass`, an NNX module, ...) that carries its own
parameters and provides::

    model(tokens[B, T] int32, positions[B, T] int32, cache, exit_layer=None)
        -> (logits[B, T, V], cache)
    model.init_cache(batch_size: int, max_length: int) -> cache   # any PyTree

It writes keys/values at `positions` and attends only to cache slots `<= position`, so
rolling back rejected speculative tokens is just passing smaller positions next time.
`exit_layer=E` returns the logits after layer E through the shared head. Optional:
`num_layers` (validates `early_exit_layer`), `max_length` (validates cache sizes), and for
self-speculative decoding that reuses the draft's work, `embed(tokens) -> hidden`,
`run_layers(hidden, positions, cache, start, stop) -> (hidden, cache)`, `logits(hidden)`.

Every decoder starts with a prefill: the prompt at positions 0.. on a fresh cache. A model
may give it a faster path with the optional `prefill(tokens, positions, cache) -> (logits,
cache)`, equal to `model(tokens, positions, cache)` for such a call (the bundled transformer's
attends only within the call rather than reading the cache); `prefill` below falls back to
`__call__`.

Beam search moves cache rows between beams with the optional
`reorder_cache(cache, indices [B'] int32) -> cache`: row i of the result is row
`indices[i]` of `cache` (B' may differ from the cache's B: the prefill of each prompt is
also copied to its beams this way). Without it, `reorder_cache(model, cache, indices)`
below gathers every cache leaf on axis 0, so then every leaf must be batch-first,
`[B, ...]`; a model whose cache merges the batch with another axis (the bundled
transformer's `[B*Hkv, ...]`) implements the method.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct


@runtime_checkable
class Model(Protocol):
    """The model contract (see the module docstring). Optional attributes: `num_layers`,
    `max_length`, `vocab_size` (Python ints)."""

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, cache: Any, exit_layer: int | None = None
    ) -> tuple[jax.Array, Any]: ...

    def init_cache(self, batch_size: int, max_length: int) -> Any: ...


@runtime_checkable
class SharesLayers(Protocol):
    """Optional methods that let self-speculative verification reuse the draft's work."""

    num_layers: int

    def embed(self, tokens: jax.Array) -> jax.Array: ...  # [B, T] -> hidden [B, T, D]

    def run_layers(
        self, hidden: jax.Array, positions: jax.Array, cache: Any, start: int, stop: int
    ) -> tuple[jax.Array, Any]: ...  # layers start .. stop - 1

    def logits(self, hidden: jax.Array) -> jax.Array: ...  # final norm + head: [B, T, V]


@struct.dataclass
class LinenModel:
    """Adapts a Linen module + its variables to the model contract.

    The module's `__call__(tokens, positions, cache, exit_layer=None)` must return
    `(logits, cache)` and it must define `init_cache(batch_size, max_length)`.

    Example:
        >>> model = LinenModel(module, module.init(rng, tokens, positions, cache))  # doctest: +SKIP
        >>> out = generate(model, prompt, key=key, config=config, max_new_tokens=32)  # doctest: +SKIP
    """

    module: nn.Module = struct.field(pytree_node=False)
    variables: Any

    def __call__(self, tokens, positions, cache, exit_layer=None):
        return self.module.apply(self.variables, tokens, positions, cache, exit_layer=exit_layer)

    def init_cache(self, batch_size: int, max_length: int):
        return self.module.apply(self.variables, batch_size, max_length, method="init_cache")

    @property
    def num_layers(self) -> int | None:
        return getattr(self.module, "num_layers", None)


def prefill_prompt(model, prompt: jax.Array, cache_length: int):
    """The prompt [B, P] at positions 0..P-1 on a fresh cache of `cache_length` slots ->
    (logits [B, P, V], cache), through `model.prefill` where the model has it."""
    batch, prompt_len = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    cache = model.init_cache(batch, cache_length)
    if hasattr(model, "prefill"):
        return model.prefill(prompt, positions, cache)
    return model(prompt, positions, cache)


def reorder_cache(model, cache, indices: jax.Array):
    """`model.reorder_cache(cache, indices)` if the model has it; else every leaf gathered
    on its batch axis, axis 0: `leaf[indices]`. indices [B'] int32 rows of the old cache."""
    if hasattr(model, "reorder_cache"):
        return model.reorder_cache(cache, indices)
    leaves = jax.tree.leaves(cache)
    batch = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(batch) > 1 or None in batch:
        raise ValueError(
            f"cannot reorder this cache by beam: its leaves' first axes differ ({sorted(map(str, batch))}); "
            "put the batch axis first in every leaf or give the model a reorder_cache(cache, indices) method"
        )
    return jax.tree.map(lambda leaf: leaf[indices], cache)
