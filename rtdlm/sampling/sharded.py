"""Sampling on meshes: the batch split over a data axis, the vocabulary over a model axis.

Large vocabularies are sharded along V by a model's output projection. `sharded_sample`
samples from such logits where they lie: each device processes its `[B/d, V/m]` block and
only per-row scalars, the `num_candidates` largest logits of each row and small histograms
cross devices (`shard_map` + `psum`/`pmax`/`all_gather` inside the sampler, see
`rtdlm.sampling.vocab`). Row keys are derived for the whole batch before splitting it, so
the tokens equal those of `rtdlm.sampling.sample` on one device with the same key.

Example (8 devices: 2-way data parallel, 4-way vocabulary sharding; the README's mesh
block runs it on 8 host devices):
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"))  # doctest: +SKIP
    >>> logits = jax.device_put(logits, NamedSharding(mesh, P("data", "model")))  # doctest: +SKIP
    >>> result = sharded_sample(mesh, jax.random.key(0), logits, config)  # doctest: +SKIP
    >>> result.all_probabilities.sharding.spec  # stays sharded like the logits  # doctest: +SKIP
    PartitionSpec('data', 'model')
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rtdlm.sampling.config import SamplingConfig
from rtdlm.sampling.processors import DEFAULT_PROCESSORS, Processor, as_processor
from rtdlm.sampling.sampler import SamplingResult, prepare_call, row_keys, sample_with


def config_partition_specs(config: SamplingConfig, batch_axis: str | None) -> SamplingConfig:
    """A PartitionSpec per config leaf: per-row values split over `batch_axis`, others replicated."""

    def spec(path, leaf):
        per_row_ndim = SamplingConfig.row_ndim(path[0].name)
        if jnp.ndim(leaf) != per_row_ndim:
            return P()
        return P(batch_axis, *([None] * (per_row_ndim - 1)))

    return jax.tree_util.tree_map_with_path(spec, config)


def state_partition_specs(state, vocab_size: int, batch_axis: str | None, vocab_axis: str):
    """A PartitionSpec per processor-state leaf: the batch axis first; a leaf whose last axis
    is the whole vocabulary (`[B, ..., V]`, e.g. token counts) is split like the logits."""

    def spec(leaf):
        ndim = jnp.ndim(leaf)
        if ndim == 0:
            return P()
        if ndim >= 2 and jnp.shape(leaf)[-1] == vocab_size:
            return P(batch_axis, *([None] * (ndim - 2)), vocab_axis)
        return P(batch_axis, *([None] * (ndim - 1)))

    return jax.tree.map(spec, state)


@functools.partial(jax.jit, static_argnames=("mesh", "batch_axis", "vocab_axis", "processors"))
def sharded_sample(
    mesh: Mesh,
    key: jax.Array,
    logits: jax.Array,
    config: SamplingConfig,
    token_history: jax.Array | None = None,
    *,
    state=None,
    batch_axis: str | None = "data",
    vocab_axis: str = "model",
    processors: Processor = DEFAULT_PROCESSORS,
) -> SamplingResult:
    """`rtdlm.sampling.sample` for `[B, V]` logits sharded as `P(batch_axis, vocab_axis)`.

    Args:
      mesh: the device mesh; `batch_axis` may be None (batch replicated).
      key, config, token_history: as for `sample` (`token_history` [B, H], -1 = padding).
      state: instead of `token_history`, the processors' state (the decode loop's); leaves
        shaped `[B, ..., V]` are split like the logits, the others over `batch_axis`.
      processors: as for `sample`. Inside `shard_map` each one sees this device's
        `[B/d, V/m]` block and `config.vocab_axis` names the vocabulary axis: the
        `rtdlm.sampling.vocab.Vocab` helpers give its token ids and whole-row reductions.
        The built-in processors all work on blocks; a processor that needs whole rows must
        gather them itself (`Vocab.gather`).

    Returns:
      `SamplingResult`; `all_probabilities` is sharded like the logits, the rest is split
      over `batch_axis` only. No `[B, V]` array is gathered.
    """
    if logits.ndim != 2:
        raise ValueError(f"sharded_sample needs [B, V] logits, got shape {logits.shape}")
    keys = row_keys(key, config, logits.shape[0])  # whole-batch keys: same draws as one device
    config = config.replace(vocab_axis=vocab_axis)
    rows, split = P(batch_axis), P(batch_axis, vocab_axis)  # split: like the logits
    out_specs = SamplingResult(rows, rows, rows, split, P(batch_axis, None), P(batch_axis, None))
    processors = as_processor(processors)
    state_specs = (
        None if state is None else state_partition_specs(state, logits.shape[1], batch_axis, vocab_axis)
    )
    history_spec = None if token_history is None else P(batch_axis, None)
    in_specs = (rows, split, config_partition_specs(config, batch_axis), history_spec, state_specs)

    def local(keys, logits, config, token_history, state):
        logits, state, _, _ = prepare_call(logits, config, token_history, state, processors)
        return sample_with(keys, logits, config, state, processors)

    # check_vma=False: cond branches mix device-varying and replicated values; every output
    # that is unsplit over `vocab_axis` comes out of a psum/all_gather, so it is replicated.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return sharded(keys, logits, config, token_history, state)
