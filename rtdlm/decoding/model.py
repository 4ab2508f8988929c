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
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
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
