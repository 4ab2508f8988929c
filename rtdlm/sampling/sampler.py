"""`sample()`: process -> truncate -> draw (the guide's `TokenSampler` lives in `rtdlm.guide`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from rtdlm.sampling.config import SamplingConfig
from rtdlm.sampling.filters import Truncation, order_key
from rtdlm.sampling.processors import (
    DEFAULT_PROCESSORS,
    Processor,
    as_processor,
    config_truncation,
    init_from_history,
    untruncated,
)
from rtdlm.sampling.vocab import LOCAL, Vocab

_DRAW_BLOCK = 256  # two-level inverse CDF: cumsum over blocks, then inside one block


@struct.dataclass
class SamplingResult:
    """One draw per row. Leading `[B]` is absent when the logits were `[V]`."""

    token_id: jax.Array  # [B] int32
    probability: jax.Array  # [B] probability of token_id under the distribution drawn from
    logprob: jax.Array  # [B] its log
    all_probabilities: jax.Array  # [B, V] that distribution, vocabulary order
    top_token_ids: jax.Array  # [B, n] the n most probable tokens, descending
    top_probabilities: jax.Array  # [B, n]


def _as_batch(logits, token_history):
    """Checks shapes; returns [B, V] float32 logits, [B, H] history or None, and squeeze."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a float array, got dtype {logits.dtype}")
    if logits.ndim not in (1, 2) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [V] or [B, V] with V >= 1, got shape {logits.shape}")
    squeeze = logits.ndim == 1
    logits = jnp.atleast_2d(logits).astype(jnp.float32)
    if token_history is not None:
        token_history = jnp.asarray(token_history)
        if token_history.size == 0:
            token_history = None
        elif not jnp.issubdtype(token_history.dtype, jnp.integer):
            raise TypeError(f"token_history must hold integer token ids, got {token_history.dtype}")
        elif token_history.ndim != (1 if squeeze else 2):
            raise ValueError(
                f"token_history must be [H] for [V] logits or [B, H] for [B, V] logits, "
                f"got {token_history.shape} for logits {logits.shape[1:] if squeeze else logits.shape}"
            )
        else:
            token_history = jnp.atleast_2d(token_history)
            if token_history.shape[0] != logits.shape[0]:
                raise ValueError(f"token_history has {token_history.shape[0]} rows, logits {logits.shape[0]}")
    return logits, token_history, squeeze


def _check_config(config: SamplingConfig, batch: int, squeeze: bool) -> None:
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    config.check_complete()
    rows = config.batch_size()
    if rows is not None and (rows != batch or squeeze):
        raise ValueError(
            f"SamplingConfig has per-row values for {rows} rows, logits have "
            f"{'no batch axis' if squeeze else f'{batch} rows'}"
        )


def process_logits(
    logits: jax.Array,
    config: SamplingConfig,
    token_history: jax.Array | None = None,
    *,
    state: Any = None,
    processors: Processor = DEFAULT_PROCESSORS,
) -> jax.Array:
    """The whole processor chain: `[V]` or `[B, V]` logits -> float32, removed tokens -inf.

    Args:
      logits: [V] or [B, V], any float dtype (computed in float32).
      config: the sampling settings (scalars or one value per row).
      token_history: [H] or [B, H] previously seen token ids, -1 = padding: the context the
        processors' state is initialised from (`init_from_history`), e.g. for the penalties.
        Standalone calls count no tokens as generated (`min_new_tokens`); pass `state` for that.
      state: instead of `token_history`, the processors' state (what the decode loops keep;
        always with the batch axis, also for `[V]` logits).
      processors: a `LogitsProcessor` or plain function (default: `DEFAULT_PROCESSORS`).
    """
    logits, state, processors, squeeze = prepare_call(logits, config, token_history, state, processors)
    processed = processors.process(logits, config, state)
    return processed[0] if squeeze else processed


def prepare_call(logits, config, token_history, state, processors):
    """Checks the arguments; returns [B, V] float32 logits, the processors' state, the
    processor and whether the logits were [V]."""
    logits, token_history, squeeze = _as_batch(logits, token_history)
    _check_config(config, logits.shape[0], squeeze)
    processors = as_processor(processors)
    if state is None:
        if token_history is None:
            token_history = jnp.zeros((logits.shape[0], 0), jnp.int32)
        state = init_from_history(processors, token_history, logits.shape[1], config)
    return logits, state, processors, squeeze


def row_keys(key: jax.Array, config: SamplingConfig, batch: int) -> jax.Array:
    """[B] keys. With per-row seeds (`config.seed` of shape [B]), row b's key is
    `fold_in(key, seed[b])`, so a row's draw does not depend on the other rows in the batch.
    Otherwise `split(fold_in(key, seed), B)` (no seed: `split(key, B)`): rows differ."""
    if config.seed is None:
        return jax.random.split(key, batch)
    seed = jnp.asarray(config.seed, jnp.uint32)
    if seed.ndim == 0:
        return jax.random.split(jax.random.fold_in(key, seed), batch)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, seed)


def draw(keys: jax.Array, weights: jax.Array, vocab: Vocab = LOCAL) -> jax.Array:
    """Inverse-CDF draw, one uniform per row: P(i) = weights[b, i] / sum(weights[b]).

    keys: [B]; weights: [B, V] >= 0 with a positive sum. Two levels (blocks, then inside one
    block) so no [B, V] cumulative sum is needed. Returns [B] int32, always a positive-weight
    token, even when float rounding puts the uniform past the last one. With a sharded
    vocabulary, the uniform first picks a device by its share of the mass, then a token
    inside that device's block (only per-row sums cross devices).
    """
    return draw_with_uniforms(jax.vmap(jax.random.uniform)(keys), weights, vocab)


def draw_with_uniforms(u: jax.Array, weights: jax.Array, vocab: Vocab = LOCAL) -> jax.Array:
    """`draw` from [B] uniforms in [0, 1) instead of keys."""
    if not vocab.sharded:
        return _inverse_cdf(u, weights)
    local_vocab = weights.shape[-1]
    shard_mass = vocab.gather(jnp.sum(weights, axis=-1, keepdims=True))  # [B, devices]
    shard_end = jnp.cumsum(shard_mass, axis=-1)
    u = u * shard_end[:, -1]
    shard = _first_above(shard_end, u, shard_mass)  # [B]
    before = jnp.take_along_axis(shard_end - shard_mass, shard[:, None], axis=1)[:, 0]
    local_mass = jnp.take_along_axis(shard_mass, shard[:, None], axis=1)[:, 0]
    token = _inverse_cdf((u - before) / local_mass, weights) + vocab.offset(local_vocab)
    return vocab.combine_sum(jnp.where(shard == lax.axis_index(vocab.axis_name), token, 0))


def _first_above(cumulative, target, mass):
    """First index whose cumulative sum exceeds target, moved onto positive mass.

    cumulative, mass: [B, N]; target: [B]. Float rounding can put `target` outside the
    range the sums cover (below 0 after subtracting a rounded prefix, past the end), and
    XLA's cumulative sums need not be monotone over zero-mass entries, so the search may
    land on a zero-mass index. By construction the result never does (if the row has any
    mass): it is the first positive-mass index at or after the search's, else the last
    positive-mass index.
    """
    index = jnp.sum(cumulative <= target[:, None], axis=-1)  # [B]
    ids = jnp.arange(mass.shape[-1])[None]
    positive = mass > 0
    at_or_after = jnp.min(jnp.where(positive & (ids >= index[:, None]), ids, mass.shape[-1]), axis=-1)
    last_positive = jnp.max(jnp.where(positive, ids, 0), axis=-1)
    return jnp.where(at_or_after < mass.shape[-1], at_or_after, last_positive)


def _inverse_cdf(u, weights):
    """[B] uniforms in [0, 1) -> [B] tokens, two-level (see `draw`)."""
    vocab = weights.shape[-1]
    if vocab <= _DRAW_BLOCK:  # one block: a cumulative sum over the row
        cumulative = jnp.cumsum(weights, axis=-1)
        return _first_above(cumulative, u * cumulative[:, -1], weights).astype(jnp.int32)
    blocks = _blocks(weights)
    return _draw_in_blocks(u, jnp.sum(blocks, axis=-1), lambda block: _take_block(blocks, block))


def _blocks(x, fill=0):
    """[B, V] -> [B, ceil(V / 256), 256], padded with `fill`."""
    batch, vocab = x.shape
    blocks = -(-vocab // _DRAW_BLOCK)
    padded = jnp.pad(x, ((0, 0), (0, blocks * _DRAW_BLOCK - vocab)), constant_values=fill)
    return padded.reshape(batch, blocks, _DRAW_BLOCK)


def _draw_in_blocks(u, block_mass, block_weights):
    """`_inverse_cdf` given the block sums [B, N] and `block_weights(block [B])`: the chosen
    blocks' weights [B, 256] (so the caller need not write all blocks out)."""
    block_end = jnp.cumsum(block_mass, axis=-1)
    u = u * block_end[:, -1]
    block = _first_above(block_end, u, block_mass)  # [B]
    inside = block_weights(block)  # [B, block]
    before = jnp.take_along_axis(block_end - block_mass, block[:, None], axis=1)[:, 0]
    offset = _first_above(jnp.cumsum(inside, axis=-1), u - before, inside)
    return (block * _DRAW_BLOCK + offset).astype(jnp.int32)


def _take_block(blocks, block):  # [B, N, 256], [B] -> [B, 256]
    return jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]


def probabilities(processed: jax.Array, vocab: Vocab = LOCAL) -> jax.Array:
    """Softmax of processed logits (-inf = removed; at least one finite per row)."""
    weights = jnp.exp(processed - vocab.max(processed)[:, None])
    return weights / vocab.sum(weights)[:, None]


def sample_processed(
    keys: jax.Array, processed: jax.Array, num_top_tokens: int = 10, vocab_axis: str | None = None
) -> SamplingResult:
    """Draws from already processed `[B, V]` logits (-inf = removed) with `[B]` keys.

    With `vocab_axis` (inside `shard_map`), `processed` is this device's vocabulary block and
    `all_probabilities` stays sharded like it; the other fields are whole-row results.
    """
    vocab = Vocab(vocab_axis)
    local_vocab = processed.shape[-1]
    row_max = vocab.max(processed)  # [B]
    weights = jnp.exp(processed - row_max[:, None])  # [B, V]
    token = draw(keys, weights, vocab)
    total = vocab.sum(weights)
    is_chosen = vocab.token_ids(local_vocab)[None] == token[:, None]
    chosen = vocab.sum(jnp.where(is_chosen, processed - row_max[:, None], 0.0))  # its logit - max
    return _result(token, chosen, total, weights / total[:, None], num_top_tokens, vocab)


def _result(token, shifted, total, all_probabilities, num_top_tokens, vocab: Vocab) -> SamplingResult:
    """The `SamplingResult` of [B] tokens whose logit - row max is `shifted`, from rows of
    kept mass `total` [B] and probabilities [B, V] (this device's block when sharded)."""
    local_vocab = all_probabilities.shape[-1]
    top_probabilities, top_ids = lax.top_k(all_probabilities, min(num_top_tokens, local_vocab))
    if vocab.sharded:
        top_ids = vocab.gather(top_ids + vocab.offset(local_vocab))
        top_probabilities, best = lax.top_k(vocab.gather(top_probabilities), num_top_tokens)
        top_ids = jnp.take_along_axis(top_ids, best, axis=-1)
    return SamplingResult(
        token_id=token.astype(jnp.int32),
        probability=jnp.exp(shifted) / total,
        logprob=shifted - jnp.log(total),
        all_probabilities=all_probabilities,
        top_token_ids=top_ids.astype(jnp.int32),
        top_probabilities=top_probabilities,
    )


def sample(
    key: jax.Array,
    logits: jax.Array,
    config: SamplingConfig,
    token_history: jax.Array | None = None,
    *,
    state: Any = None,
    processors: Processor = DEFAULT_PROCESSORS,
) -> SamplingResult:
    """Samples one token per row. Pure: jit- and vmap-able; values in `config` are traced.

    Args:
      key: a PRNG key (`jax.random.key` or `PRNGKey`).
      logits: [V] or [B, V] float32/bfloat16.
      config: `SamplingConfig`; greedy rows (temperature 0 or do_sample False) take the
        argmax of the processed logits and report probability 1.
      token_history: [H] or [B, H] int token ids, -1 = padding (for the penalties).
      state, processors: as for `process_logits`.

    Outcome for degenerate rows: NaN logits count as removed; a row with nothing finite
    samples uniformly (greedy: token 0). The result never holds NaN.

    Example:
      >>> result = sample(jax.random.key(0), logits, SamplingConfig(temperature=0.7, top_p=0.9))
      >>> result.token_id.shape, result.probability.dtype  # logits [V]: one token
      ((), dtype('float32'))
    """
    logits, state, processors, squeeze = prepare_call(logits, config, token_history, state, processors)
    keys = row_keys(key, config, logits.shape[0])
    result = sample_with(keys, logits, config, state, processors)
    return jax.tree.map(lambda x: x[0], result) if squeeze else result


def sample_with(
    keys: jax.Array,
    logits: jax.Array,
    config: SamplingConfig,
    state: Any,
    processors,
    *,
    return_processed: bool = False,
) -> SamplingResult | tuple[SamplingResult, jax.Array]:
    """Processes `[B, V]` float32 logits with the processors' state and draws with `[B]` keys.

    When the processors end with `apply_truncation` (as `DEFAULT_PROCESSORS` do), the
    truncation is applied here: rows whose kept set lies in their candidates draw among
    those (`sample_truncation`) instead of the whole row. With `config.vocab_axis` (inside
    `shard_map`) the logits are this device's vocabulary block. `return_processed`: also
    return the processed `[B, V]` logits (what `process_logits` gives), without processing
    twice.
    """
    processors = as_processor(processors)
    before_truncation = untruncated(processors)
    if before_truncation is None:
        processed = processors.process(logits, config, state)
        result = sample_processed(keys, processed, config.num_top_tokens, config.vocab_axis)
    else:
        truncation = config_truncation(before_truncation(logits, config, state), config)
        result = sample_truncation(keys, truncation, config.num_top_tokens)
        processed = truncation.processed() if return_processed else None
    return (result, processed) if return_processed else result


def sample_truncation(keys: jax.Array, t: Truncation, num_top_tokens: int = 10) -> SamplingResult:
    """Draws one token per row from a truncation's kept set, with `[B]` keys.

    A row whose kept set lies in its candidates (`t.inside`; greedy rows: when their maximum
    is a candidate) draws among its C candidates, with no pass over the row; the others (a
    `lax.cond` skips this when there are none) from the whole row: under the candidates' rule
    where it is exact, else by rejection (`_draw_outside_candidates`), so a caller who uses
    only the token never runs the whole-row threshold search for top-p/min-p rows. Each
    row's path depends on its own logits and key only, and every path gives its exact
    distribution. When the candidates are the whole row (C >= V), every row draws from it.
    `all_probabilities`, the probabilities and the top tokens are computed only if used
    (XLA drops them otherwise).
    """
    vocab = t.vocab
    local_vocab = t.logits.shape[-1]
    row_max = t.row_max[:, None]
    u = jax.vmap(jax.random.uniform)(keys)  # [B]

    def shifted_logit(token):  # [B]: the token's logit - row max
        is_chosen = vocab.token_ids(local_vocab)[None] == token[:, None]
        return jnp.where(t.empty, 0.0, vocab.sum(jnp.where(is_chosen, t.logits - row_max, 0.0)))

    def from_rows(rule=None):  # token, its logit - row max, the kept mass: drawn from the whole row
        row_weights = t.weights(rule)  # [B, V]
        token = draw_with_uniforms(u, row_weights, vocab)
        return token, shifted_logit(token), vocab.sum(row_weights)

    if t.candidates.shape[-1] == local_vocab and not vocab.sharded:  # the candidates are the row
        token, shifted, total = from_rows()
    else:
        keep = t.candidate_rule.keep(t.candidates)  # the full row's rule on the rows drawn here
        weights = jnp.where(keep, jnp.exp(t.candidates - row_max), 0.0)  # [B, C]
        index = _inverse_cdf(u, weights)[:, None]
        first_max = jnp.min(
            jnp.where(t.candidates == row_max, t.candidate_ids, vocab.size(local_vocab)), axis=-1
        )
        from_candidates = (
            jnp.where(t.greedy, first_max, jnp.take_along_axis(t.candidate_ids, index, axis=1)[:, 0]),
            jnp.where(t.greedy, 0.0, jnp.take_along_axis(t.candidates, index, axis=1)[:, 0] - t.row_max),
            jnp.where(t.greedy, 1.0, jnp.sum(weights, axis=-1)),
        )
        on_candidates = ~t.empty & jnp.where(t.greedy, t.row_max > t.bound, t.inside)  # [B]

        def by_rejection():
            token = _draw_outside_candidates(keys, u, t, on_candidates)
            return token, shifted_logit(token), vocab.sum(t.weights())

        def mixed():
            if vocab.sharded:
                whole = from_rows()
            else:
                whole = lax.cond(jnp.all(t.exact), lambda: from_rows(t.candidate_rule), by_rejection)
            return tuple(jnp.where(on_candidates, c, w) for c, w in zip(from_candidates, whole, strict=True))

        token, shifted, total = lax.cond(jnp.all(on_candidates), lambda: from_candidates, mixed)
    all_weights = t.weights()
    return _result(
        token, shifted, total, all_weights / vocab.sum(all_weights)[:, None], num_top_tokens, vocab
    )


_MAX_DRAWS = 8  # rejection draws per row before its rule decides
_RULE_ROWS = 2  # rows the rule decides for alone: more go to the whole batch's rule


def _mass_rounding_bound(vocab: int) -> float:
    """How far, relative to the row's total mass, two float32 sums of the same token masses
    can differ: the rule's (a segment sum per radix bin, then for each of 3 digits a
    cumulative sum over 2048 bins) and `_draw_by_rejection`'s (blocks of 256, then the
    blocks). Adding n non-negative terms in any order errs by at most (n - 1) u of their sum
    (u = 2^-24); exp of one input may differ by an ulp or two between programs; the factor
    1.5 covers the second-order terms. (0.35% of the mass at V = 32000.)"""
    return 1.5 * (vocab + 3 * 2048 + _DRAW_BLOCK + vocab / _DRAW_BLOCK + 16) * 2.0**-24


def _draw_outside_candidates(keys, u, t: Truncation, on_candidates):
    """[B] tokens for the rows not `on_candidates` (the other rows' entries are arbitrary).

    Rows with only top-p and min-p on draw by rejection (`_draw_by_rejection`); the rest,
    and the rows rejection leaves undecided, under the whole row's rule (a `lax.cond` runs
    it only if there are such rows, on those rows alone when they are few): an undecided
    draw is kept if the rule keeps it, else the row draws again from the rule's kept set
    with a fresh uniform.

    Under `jax.vmap` with the logits shared by the instances (many draws from one batch),
    every row draws under the whole row's rule instead, computed once for all instances:
    the same distribution, but not the same token for a key as an unbatched call. (By
    rejection, each instance would write its own [B, V] masses each round.)
    """
    return _off_candidates(tuple(t[:-1]), keys, u, on_candidates)


def _off_candidates_unbatched(fields, keys, u, on_candidates):
    t = Truncation(*fields)
    top_k, _, _, typical_p, min_keep = t.rule_params
    simple = (top_k == 0) & (typical_p >= 1.0) & (min_keep <= 1) & ~t.greedy & ~t.empty
    by_rejection = ~on_candidates & simple
    token, ambiguous, unjudged = _draw_by_rejection(keys, u, t, by_rejection)
    needs_rule = ~on_candidates & (~by_rejection | ambiguous | unjudged)
    fresh = jnp.where(by_rejection, _round_uniforms(keys, _MAX_DRAWS), u)
    return _decide_by_rule(fields, token, ambiguous, fresh, needs_rule)


_off_candidates = jax.custom_batching.custom_vmap(_off_candidates_unbatched)


@_off_candidates.def_vmap
def _off_candidates_batched(axis_size, in_batched, fields, keys, u, on_candidates):
    fields_batched, *rest_batched = in_batched
    in_axes = jax.tree.map(lambda batched: 0 if batched else None, (fields_batched, *rest_batched))
    if any(jax.tree.leaves(fields_batched)):  # each instance has its own logits
        draw = jax.vmap(_off_candidates_unbatched, in_axes=in_axes, axis_size=axis_size)
        return draw(fields, keys, u, on_candidates), True

    def by_rule(u):  # the rule and the weights are the instances' shared values
        t = Truncation(*fields)
        return _inverse_cdf(u, t.weights(t.whole_row_rule()))

    return jax.vmap(by_rule, in_axes=in_axes[2], axis_size=axis_size)(u), True


def _decide(t: Truncation, token, ambiguous, fresh):
    """[B] tokens: `token` where it is `ambiguous` and the rule keeps it, else a draw from the
    rule's kept set with `fresh` [B] uniforms (each row's result depends on that row only)."""
    rule = t.whole_row_rule()
    kept = ambiguous & rule.keep(jnp.take_along_axis(t.logits, token[:, None], axis=1))[:, 0]
    return jnp.where(kept, token, _inverse_cdf(fresh, t.weights(rule)))


def _decide_all_rows(fields, token, ambiguous, fresh, needs_rule):
    return jnp.where(needs_rule, _decide(Truncation(*fields), token, ambiguous, fresh), token)


@jax.custom_batching.custom_vmap
def _decide_by_rule(fields, token, ambiguous, fresh, needs_rule):
    """`_decide` for the rows that `needs_rule`: none, those few alone (the rule's radix
    passes then read _RULE_ROWS rows, not B), or the whole batch. `fields`: a local
    `Truncation`'s fields but the vocabulary."""

    def few_rows():
        rows = jnp.nonzero(needs_rule, size=_RULE_ROWS)[0]  # padded with row 0
        picked = jax.tree.map(lambda x: x[rows], (fields, token, ambiguous, fresh))
        decided = _decide(Truncation(*picked[0]), *picked[1:])
        return token.at[rows].set(jnp.where(needs_rule[rows], decided, token[rows]))

    count = jnp.sum(needs_rule)
    few = (count <= _RULE_ROWS) & (token.shape[0] > _RULE_ROWS)
    branch = jnp.where(count == 0, 0, jnp.where(few, 1, 2))
    all_rows = functools.partial(_decide_all_rows, fields, token, ambiguous, fresh, needs_rule)
    return lax.switch(branch, [lambda: token, few_rows, all_rows])


@_decide_by_rule.def_vmap
def _decide_by_rule_batched(axis_size, in_batched, fields, token, ambiguous, fresh, needs_rule):
    # Under `jax.vmap` a branch index differs per instance, so every branch would run, and
    # gathering rows would copy [instances, rows, V]: decide on the whole batch instead.
    in_axes = jax.tree.map(lambda batched: 0 if batched else None, tuple(in_batched))
    decide = jax.vmap(_decide_all_rows, in_axes=in_axes, axis_size=axis_size)
    return decide(fields, token, ambiguous, fresh, needs_rule), True


def _round_uniforms(keys, draw):  # [B] uniforms of rejection draw `draw` >= 1
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, draw)))(keys)


def _draw_by_rejection(keys, u, t: Truncation, active):
    """Draws from top-p and min-p's kept set for the `active` rows without searching for
    top-p's threshold (as FlashInfer does on GPU).

    Draw x from the tokens above a pivot (at first: all, with uniform `u`). Top-p keeps x
    iff the mass of the tokens strictly above it is below `top_p * total_mass`; min-p iff
    its logit reaches min-p's threshold. Both remove every token below a removed one, so
    when x is removed the pivot moves up to x and the tokens drawn from still hold the
    whole kept set: the draw that is kept follows the kept distribution exactly. A round is
    one pass over the row: the masses above the pivot, in blocks; their total judges the
    last draw and the blocks draw the next. A mass within the float rounding bound of the
    target (`_mass_rounding_bound`) leaves the draw `ambiguous` for the rule to judge.

    Returns [B] tokens, [B] bool ambiguous, [B] bool unjudged (still removed after
    `_MAX_DRAWS` draws; the token is a fresh, unjudged draw).
    """
    _, top_p, min_p_key, _, _ = t.rule_params
    logits = _blocks(t.logits, -jnp.inf)  # [B, N, 256]
    mass = _blocks(jnp.exp(t.logits - t.row_max[:, None]))
    target = top_p * t.total_mass
    slack = _mass_rounding_bound(t.logits.shape[-1]) * t.total_mass
    use_p = top_p < 1.0

    def judge_and_draw(carry):
        draw, token, pivot, active, ambiguous = carry

        def above(logits, mass):  # the mass of the tokens above the pivot
            return jnp.where(order_key(logits) > pivot.reshape((-1,) + (1,) * (logits.ndim - 1)), mass, 0.0)

        block_mass = jnp.sum(above(logits, mass), axis=-1)  # [B, N]
        # [B]: of the tokens above the last draw (a cumulative sum, which XLA does not merge
        # with the block sums into one reduction that would need the masses written out)
        mass_above = jnp.cumsum(block_mass, axis=-1)[:, -1]
        min_p_keeps = pivot >= min_p_key
        kept = (~use_p | (mass_above < target - slack)) & min_p_keeps
        removed = (use_p & (mass_above >= target + slack)) | ~min_p_keeps
        first = draw == 0
        ambiguous |= active & ~first & ~kept & ~removed
        redraw = active & (first | removed)
        round_u = jnp.where(first, u, _round_uniforms(keys, draw))
        drawn = _draw_in_blocks(
            round_u, block_mass, lambda block: above(_take_block(logits, block), _take_block(mass, block))
        )
        token = jnp.where(redraw, drawn, token)
        drawn_key = order_key(jnp.take_along_axis(t.logits, token[:, None], axis=1)[:, 0])
        return draw + 1, token, jnp.where(redraw, drawn_key, pivot), redraw, ambiguous

    nothing = jnp.zeros_like(active)
    start = (jnp.int32(0), nothing.astype(jnp.int32), nothing.astype(jnp.uint32), active, nothing)
    carry = lax.while_loop(lambda c: (c[0] <= _MAX_DRAWS) & jnp.any(c[3]), judge_and_draw, start)
    return carry[1], carry[4], carry[3]
