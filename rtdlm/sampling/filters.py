"""Exact truncation (top-k, top-p, min-p, typical-p, greedy) without sorting the vocabulary.

Every filter keeps the tokens at or above a threshold, so the whole truncation is a
per-row rule "keep `z >= t`" (typical-p adds a band `|z - c| <= r`). Thresholds are searched
on the float32 bit patterns mapped to order-preserving uint32 keys (`_largest_threshold`:
all pairs at once for narrow rows, radix select for wide ones), exact, ties kept.

Fast path: the searches run on each row's `num_candidates` largest logits, found in two
levels without a top-k over the whole row (`_candidates`: the maxima of blocks of 16, the
C blocks with the largest maxima, the C largest of their logits), with a `bound` above
which every logit is a candidate. A threshold computed on the candidates is the full row's
when it lies above the bound (and, for top-k, top-p's crossing and min-p, also at it:
`_candidate_rule`); ties of the bound's value outside the candidates (common with
bfloat16-valued logits) matter only below it. Otherwise (`lax.cond`, whole batch) the same
searches run on the full vocabulary. On wide rows the candidates are first only C/2
(`_exact_candidate_rule`), then all C where some row needs more. Where the kept set lies
inside the candidates, a sampler can draw among them (`Truncation`, `sampler.sample_truncation`).

Tie rule: tokens whose logit equals the threshold are all kept (top-k keeps ties with the
k-th value, top-p keeps ties with the crossing token); HF transformers breaks such ties by
sort order. On continuous logits the kept sets are identical.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rtdlm.sampling.vocab import LOCAL, Vocab

_RADIX_SHIFTS = (21, 10, 0)  # the uint32 key's digits, high first: bits 21-31, 10-20, 0-9
_RADIX_SIZE = 1 << 11  # histogram bins per digit (the last digit uses 1024 of them)
_PAIRWISE_MAX_WIDTH = 512  # rows up to this wide compare all pairs; wider: radix select
_MIN_KEY = jnp.uint32(0)
_MAX_KEY = jnp.uint32(0xFFFFFFFF)


def order_key(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that `x < y` iff `key(x) < key(y)` (-inf lowest)."""
    x = jnp.where(x == 0, 0.0, x)  # -0.0 -> +0.0 (XLA folds the cheaper `x + 0.0` away)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(
    keys: jax.Array, weights: jax.Array, target: jax.Array, vocab: Vocab = LOCAL
) -> jax.Array:
    """Largest t with `sum(weights[keys >= t]) >= target`, per row (exact; a key of a
    positive-weight element). keys, weights: [B, N]; target: [B]. If the target is
    unreachable, returns a key <= every key (callers check reachability themselves).

    Narrow rows (candidate sets, small vocabularies): all N thresholds at once, O(N^2)
    work but no loop. Wide or sharded rows: radix select, 3 histogram passes (with a
    sharded vocabulary only the [B, 2048] histograms cross devices).
    """
    if vocab.sharded or keys.shape[-1] > _PAIRWISE_MAX_WIDTH:
        return _radix_select(keys, weights, target, vocab)
    return _pairwise_threshold(keys, weights, target)


def _pairwise_threshold(keys, weights, target):
    at_or_above = keys[:, None, :] >= keys[:, :, None]  # [B, N, N]: key i >= key j
    mass = jnp.sum(jnp.where(at_or_above, weights[:, None, :], 0.0), axis=-1)  # [B, N] per key j
    return jnp.max(jnp.where(mass >= target[:, None], keys, _MIN_KEY), axis=-1)


def _radix_select(keys, weights, target, vocab: Vocab = LOCAL):
    """Radix select: one histogram pass per digit, in a loop (its body compiles once)."""
    batch = keys.shape[0]
    rows = jnp.arange(batch)[:, None]
    shifts = jnp.asarray(_RADIX_SHIFTS, jnp.uint32)
    highs = jnp.asarray((32,) + _RADIX_SHIFTS[:-1], jnp.uint32)  # where each digit ends

    def digit_pass(i, carry):
        prefix, above = carry  # the threshold's bits decided so far; mass above all candidates
        shift, high = shifts[i], highs[i]
        # 11 bits (the last digit's top bit, bit 10, is already decided: its bins stay apart)
        digit = ((keys >> shift) & (_RADIX_SIZE - 1)).astype(jnp.int32)
        # Only keys sharing the decided prefix compete; the others are dropped.
        competing = (high == 32) | ((keys >> (high & 31)) == (prefix >> (high & 31))[:, None])
        # One flat segment sum (XLA:CPU runs it faster than a [B, size] scatter); the other
        # keys get an out-of-range bin, which drops them (one shared bin would serialise the adds).
        bins = jnp.where(competing, rows * _RADIX_SIZE + digit, batch * _RADIX_SIZE)
        hist = jax.ops.segment_sum(weights.ravel(), bins.ravel(), batch * _RADIX_SIZE)
        hist = vocab.combine_sum(hist.reshape(batch, _RADIX_SIZE))
        at_or_above = lax.cumsum(hist, axis=1, reverse=True)  # [B, size] mass of digits >= d
        reaches = above[:, None] + at_or_above >= target[:, None]  # True up to the answer
        best = jnp.maximum(jnp.sum(reaches, axis=-1) - 1, 0)  # [B]
        strictly_above = jnp.pad(at_or_above, ((0, 0), (0, 1)))[rows[:, 0], best + 1]
        return prefix | (best.astype(jnp.uint32) << shift), above + strictly_above

    start = (jnp.zeros(batch, jnp.uint32), jnp.zeros(batch, weights.dtype))
    return lax.fori_loop(0, len(_RADIX_SHIFTS), digit_pass, start)[0]


class KeepRule(NamedTuple):
    """Per-row rule: keep token i iff `key(z_i) >= threshold` and, where typical-p is on,
    `key(-|z_i - typical_center|) >= typical_threshold`. All fields `[B]`."""

    threshold: jax.Array  # uint32 key
    typical_center: jax.Array  # float32
    typical_threshold: jax.Array  # uint32 key (0 = off)

    def keep(self, z: jax.Array) -> jax.Array:  # z: [B, N] -> [B, N] bool
        by_value = order_key(z) >= self.threshold[:, None]
        return lax.cond(  # the typical band only costs a pass when some row uses it
            jnp.any(self.typical_threshold > _MIN_KEY),
            lambda: by_value & (_typical_key(z, self.typical_center) >= self.typical_threshold[:, None]),
            lambda: by_value,
        )


def _typical_key(z, center):
    return order_key(-jnp.abs(z - center[:, None]))


def _keep_rule(values, row_max, total_mass, top_k, top_p, min_p_key, typical_p, min_keep, vocab=LOCAL):
    """Thresholds computed on `values` [B, N] (the whole row or its largest N logits;
    `vocab` says whether `values` is one shard of a vocabulary-sharded row).

    `min_keep` [B] (Hugging Face's `min_tokens_to_keep`): top-p and min-p never cut below
    the min_keep-th largest logit, typical-p keeps at least the min_keep tokens closest to
    the entropy (ties kept, as everywhere).

    Returns the rule and, per row, whether the top-p crossing was reached inside `values`
    and top-p's own threshold (the key `_MIN_KEY` when off or not reached).
    `total_mass` [B] is the whole row's sum of exp(z - row_max) (top-p's normaliser when
    top-k is off).

    The five threshold searches run as the stages of one loop, so the search compiles once
    (each stage is skipped when no row uses it):
      0 top-k: the top_k-th largest key       1 min_keep: the min_keep-th largest key
      2 top-p: mass of the top-k kept set     3 typical-p: mass of the tokens nearest the
      4 typical min_keep: count, as 3           entropy of the kept set
    """
    keys = order_key(values)
    mass = jnp.exp(values - row_max[:, None])  # [B, N]; 0 for -inf
    count = jnp.ones_like(mass)
    use_k, use_p, use_m, use_typical = top_k > 0, top_p < 1.0, min_keep > 1, typical_p < 1.0
    off = jnp.asarray([_MIN_KEY, _MAX_KEY, _MIN_KEY, _MIN_KEY, _MAX_KEY])  # a skipped stage's result

    def top_k_mass(found):  # [B, N] mass of the top-k kept set, its sum, top-p's target
        mass_k = jnp.where(keys >= found[0][:, None], mass, 0.0)
        kept_mass_k = vocab.sum(mass_k)
        return mass_k, kept_mass_k, top_p * jnp.where(use_k, kept_mass_k, total_mass)

    def top_p_stage(found, center):
        mass_k, _, target_p = top_k_mass(found)
        return keys, mass_k, target_p, center

    def value_threshold(found):
        t_k, t_m, t_p = found[0], found[1], found[2]
        return jnp.maximum(t_k, jnp.minimum(jnp.maximum(t_p, min_p_key), t_m))

    def typical_keys(found, center):  # keys by distance from the center; kept tokens only
        kept = keys >= value_threshold(found)[:, None]
        return jnp.where(kept, _typical_key(values, center), _MIN_KEY), kept

    def typical_mass_stage(found, center):
        # Distance of -log q_i from the entropy H of the kept distribution q:
        # |-log q_i - H| = |z_i - center| with center = row_max + log Z - H.
        kept_mass = jnp.where(keys >= value_threshold(found)[:, None], mass, 0.0)
        z_kept = vocab.sum(kept_mass)
        q = kept_mass / z_kept[:, None]
        log_q = jnp.where(q > 0, values - row_max[:, None] - jnp.log(z_kept)[:, None], 0.0)
        entropy = -vocab.sum(q * log_q)
        center = row_max + jnp.log(z_kept) - entropy
        return typical_keys(found, center)[0], kept_mass, typical_p * z_kept, center

    def typical_count_stage(found, center):
        # Tokens kept by value whose mass underflows still have a distance (HF's log-softmax
        # is finite): they count for min_keep, and weigh nothing for the mass.
        stage_keys, kept = typical_keys(found, center)
        return stage_keys, kept.astype(mass.dtype), min_keep.astype(mass.dtype), center

    stages = (  # (found [5, B], center [B]) -> the stage's keys, weights, target, center
        lambda found, center: (keys, count, top_k.astype(mass.dtype), center),
        lambda found, center: (keys, count, min_keep.astype(mass.dtype), center),
        top_p_stage,
        typical_mass_stage,
        typical_count_stage,
    )
    uses = jnp.stack([use_k, use_m, use_p, use_typical, use_typical & use_m])  # [5, B]: rows per stage

    def stage(s, carry):
        def search():
            stage_keys, weights, target, center = lax.switch(s, stages, *carry)
            return jnp.where(uses[s], _largest_threshold(stage_keys, weights, target, vocab), off[s]), center

        def skip():
            return jnp.full_like(carry[0][s], off[s]), carry[1]

        result, center = lax.cond(jnp.any(uses[s]), search, skip)
        return carry[0].at[s].set(result), center

    start = (jnp.broadcast_to(off[:, None], (len(stages), keys.shape[0])), jnp.zeros_like(row_max))
    found, center = lax.fori_loop(0, len(stages), stage, start)
    _, kept_mass_k, target_p = top_k_mass(found)
    t_typ = jnp.where(use_typical, jnp.minimum(found[3], found[4]), _MIN_KEY)
    p_reached = ~use_p | (kept_mass_k >= target_p)
    return KeepRule(value_threshold(found), center, t_typ), p_reached, found[2]


class Truncation(NamedTuple):
    """The truncation of `[B, V]` logits, before it is applied: the exact per-row rule, and
    the candidates a draw can use instead of the whole row (`truncation`).

    `rule` is computed only where it is used (XLA drops it otherwise): a sampler that needs
    only the token can draw under `candidate_rule` where it is `exact`, and elsewhere decide
    membership itself, calling `whole_row_rule()` only for the rows it cannot decide."""

    logits: jax.Array  # [B, V] float32 the rule applies to (NaN -> -inf, +inf -> max float)
    row_max: jax.Array  # [B] (0 for empty rows)
    empty: jax.Array  # [B] bool: rows with no finite logit (kept whole, uniform)
    rule: KeepRule  # exact for every non-empty row; rows without a filter keep everything
    greedy: jax.Array  # [B] bool: these rows keep only their first maximum
    candidates: jax.Array  # [B, C] float32: the largest logits (all of them when C = V)
    candidate_ids: jax.Array  # [B, C] int32 token ids (may be >= V where a value is -inf)
    bound: jax.Array  # [B]: every logit > bound is a candidate (+inf: none is known to be)
    inside: jax.Array  # [B] bool: the rule keeps only candidates (and -inf logits)
    candidate_rule: KeepRule  # computed on the candidates; the full row's where `exact`
    exact: jax.Array  # [B] bool
    total_mass: jax.Array  # [B] sum of exp(logits - row_max) (1 where no row needs it)
    rule_params: tuple  # [B] each: top_k, top_p, min-p's key, typical_p, min_keep (clamped)
    vocab: Vocab = LOCAL  # sharded: `logits` is this device's block; the rest is whole-row

    def whole_row_rule(self) -> KeepRule:
        """The rule computed on the whole row (`rule` where not every row is `exact`)."""
        return _keep_rule(self.logits, self.row_max, self.total_mass, *self.rule_params, self.vocab)[0]

    def keep(self, rule: KeepRule | None = None) -> jax.Array:
        """[B, V] bool: the tokens kept (greedy rows: the first maximum only) under `rule`
        (default: `self.rule`)."""
        keep = (self.rule if rule is None else rule).keep(self.logits)
        return _keep_with_greedy(keep, self.logits, self.row_max, self.empty, self.greedy, self.vocab)

    def weights(self, rule: KeepRule | None = None) -> jax.Array:
        """[B, V] unnormalised probabilities of the kept tokens (empty rows: uniform)."""
        mass = jnp.where(self.empty[:, None], 1.0, jnp.exp(self.logits - self.row_max[:, None]))
        return jnp.where(self.keep(rule), mass, 0.0)

    def processed(self) -> jax.Array:
        """[B, V] logits with the removed tokens at -inf (what `truncate` returns)."""
        return _apply(self.keep(), self.logits, self.empty)


def _keep_with_greedy(keep, z, row_max, empty, greedy, shards=LOCAL):
    """`keep` [B, V] with empty rows kept whole and greedy rows reduced to their first
    maximum (token 0 for an empty row)."""
    keep = keep | empty[:, None]
    local_vocab = z.shape[-1]
    token_ids = shards.token_ids(local_vocab)

    def greedy_rows():
        first_max = shards.min(jnp.where(z == row_max[:, None], token_ids[None], shards.size(local_vocab)))
        first_max = jnp.where(empty, 0, first_max)
        return jnp.where(greedy[:, None], token_ids[None] == first_max[:, None], keep)

    return lax.cond(jnp.any(greedy), greedy_rows, lambda: keep)


def _apply(keep, z, empty):
    return jnp.where(keep, jnp.where(empty[:, None], 0.0, z), -jnp.inf)


def truncation(
    logits: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    typical_p: jax.Array,
    greedy: jax.Array,
    num_candidates: int = 128,
    vocab_axis: str | None = None,
    min_tokens_to_keep: jax.Array | int = 1,
) -> Truncation:
    """Top-k, top-p, min-p, typical-p (in that order) and greedy for `[B, V]` logits, not yet
    applied: `truncate` applies it; a sampler draws from the candidates where the kept set
    lies inside them (`sampler.sample_truncation`).

    Per-row parameters are `[B]` arrays (off: top_k 0, top_p 1, min_p 0, typical_p 1).
    `min_tokens_to_keep` ([B] or scalar, Hugging Face's): top-k keeps at least that many,
    top-p and min-p never cut below the min_tokens_to_keep-th largest logit, and typical-p
    keeps at least the min_tokens_to_keep tokens closest to the entropy.
    Removed tokens become -inf. NaN logits count as -inf, +inf as the largest float; a row
    with no finite logit becomes all zeros (uniform; greedy picks token 0).

    `vocab_axis`: inside `shard_map`, the mesh axis the vocabulary is split over; `logits`
    is then this device's `[B, V/n]` block, and only per-row scalars, the candidate sets
    and small histograms cross devices.

    `.processed()` is `truncate`'s result: [B, V] float32 (the local block when sharded).
    """
    shards = Vocab(vocab_axis)
    vocab = shards.size(logits.shape[-1])
    min_keep = jnp.broadcast_to(jnp.asarray(min_tokens_to_keep, jnp.int32), top_k.shape)
    z, row_max, empty, params = _prepare(logits, top_k, top_p, min_p, typical_p, min_keep, vocab, shards)
    filtering = _filtering(params)
    total_mass, beyond_candidates = _top_p_masses(z, row_max, params, min(num_candidates, vocab), shards)
    rule_params = _rule_params(row_max, *params)

    def whole_row_rule():
        return _keep_rule(z, row_max, total_mass, *rule_params, shards)[0]

    if num_candidates >= vocab and not shards.sharded:  # the whole row is the candidate set
        rule = lax.cond(jnp.any(filtering), whole_row_rule, lambda: _keep_everything(row_max))
        ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), z.shape)
        nothing_outside = jnp.full_like(row_max, -jnp.inf)
        everywhere = jnp.ones_like(greedy)
        return Truncation(
            z, row_max, empty, rule, greedy, z, ids, nothing_outside, everywhere,
            rule, everywhere, total_mass, rule_params, shards,
        )  # fmt: skip

    def search():
        return _exact_candidate_rule(z, row_max, total_mass, params, num_candidates, shards)

    def no_search():  # keep everything where no filter is on, know nothing about candidates
        nothing = jnp.full((z.shape[0], min(num_candidates, vocab)), -jnp.inf)
        unknown = jnp.full_like(row_max, jnp.inf)
        ids = jnp.zeros(nothing.shape, jnp.int32)
        return _keep_everything(row_max), ~filtering, nothing, ids, unknown, jnp.zeros_like(greedy)

    # Rows whose top-p nucleus provably exceeds the C candidates skip the search (a
    # policy, as for `widen`: the whole row is exact in every case).
    candidate_rule, exact, values, ids, bound, inside = lax.cond(
        jnp.any(filtering & ~beyond_candidates), search, no_search
    )
    # Its own conditional, so that a caller who never reads `rule` does not run it.
    rule = lax.cond(jnp.all(exact), lambda: candidate_rule, whole_row_rule)
    return Truncation(
        z, row_max, empty, rule, greedy, values, ids, bound, inside,
        candidate_rule, exact, total_mass, rule_params, shards,
    )  # fmt: skip


def truncate(logits: jax.Array, *args, **kwargs) -> jax.Array:
    """Applies top-k, top-p, min-p, typical-p and greedy to `[B, V]` logits: removed tokens
    become -inf (arguments and outcome as for `truncation`)."""
    return truncation(logits, *args, **kwargs).processed()


def _prepare(logits, top_k, top_p, min_p, typical_p, min_keep, vocab, shards):
    """float32 logits with NaN -> -inf, +inf -> max float; [B] row max (0 where `empty`:
    rows with no finite logit, which the rule's users keep whole); the parameters clamped
    to their documented ranges. (Empty rows are flagged, not rewritten: the logits are then
    written once, and every reduction reads that copy.)"""
    z = jnp.where(jnp.isnan(logits), -jnp.inf, logits.astype(jnp.float32))
    z = jnp.minimum(z, jnp.finfo(jnp.float32).max)
    row_max = shards.max(z)  # [B]
    empty = row_max == -jnp.inf
    row_max = jnp.where(empty, 0.0, row_max)  # finite
    min_keep = jnp.clip(min_keep, 1, vocab).astype(jnp.int32)
    top_k = jnp.where(top_k > 0, jnp.maximum(top_k, min_keep), 0)  # Hugging Face's top-k rule
    top_k = jnp.where(top_k < vocab, top_k, 0).astype(jnp.int32)
    top_p = jnp.clip(jnp.nan_to_num(top_p, nan=1.0), jnp.finfo(jnp.float32).tiny, 1.0)
    typical_p = jnp.clip(jnp.nan_to_num(typical_p, nan=1.0), jnp.finfo(jnp.float32).tiny, 1.0)
    min_p = jnp.clip(jnp.nan_to_num(min_p, nan=0.0), 0.0, 1.0)
    return z, row_max, empty, (top_k, top_p, min_p, typical_p, min_keep)


def _filtering(params):
    """[B] bool: rows with any value filter on (the others keep every token)."""
    top_k, top_p, min_p, typical_p, _ = params
    return (top_k > 0) | (top_p < 1.0) | (min_p > 0.0) | (typical_p < 1.0)


def _keep_everything(row_max):
    zeros = jnp.zeros(row_max.shape, jnp.uint32)
    return KeepRule(zeros, jnp.zeros_like(row_max), zeros)


def _top_p_masses(z, row_max, params, width, shards=LOCAL):
    """[B] sum of exp(z - row_max), top-p's normaliser where top-k is off (the one rule input
    that needs a pass over the whole row, so it is skipped when no row needs it), and [B]
    bool: the rows whose top-p nucleus provably holds more than `width` tokens, from one
    count. With n logits at or above row_max - 1 (each of mass <= 1) and the rest below (each
    < 1/e), the `width` largest hold at most min(n, width) + max(width - n, 0) / e; below
    top-p's target, the nucleus is wider."""
    top_k, top_p, *_ = params
    needs_total = (top_p < 1.0) & (top_k == 0)

    def masses():
        total = shards.sum(jnp.exp(z - row_max[:, None]))
        target = top_p * total
        may_be_wider = needs_total & (target > width * math.exp(-1.0))  # else the bound cannot show it

        def count():
            near_max = jnp.minimum(shards.sum((z >= (row_max - 1.0)[:, None]).astype(jnp.int32)), width)
            return may_be_wider & (near_max + (width - near_max) * math.exp(-1.0) < target)

        return total, lax.cond(jnp.any(may_be_wider), count, lambda: may_be_wider)

    def unused():
        return jnp.ones_like(row_max), jnp.zeros_like(needs_total)

    return lax.cond(jnp.any(needs_total), masses, unused)


def _rule_params(row_max, top_k, top_p, min_p, typical_p, min_keep):
    min_p_key = order_key(row_max + jnp.log(min_p))  # min-p relative to the top token
    return top_k, top_p, min_p_key, typical_p, min_keep


_CANDIDATE_BLOCK = 16  # the candidate search first picks the blocks of 16 logits with the largest maxima


def _two_level(local_vocab: int, width: int) -> bool:
    """Whether `_candidates` searches blocks first: rows of at least 4 C blocks."""
    return -(-local_vocab // _CANDIDATE_BLOCK) >= 4 * width


def _candidates(z, num_candidates, shards=LOCAL):
    """Each row's C largest logits, exactly, without running `lax.top_k` over the row.

    Returns values [B, C] (descending), their token ids [B, C], and `bound` [B]: every logit
    > bound is a candidate. Two levels when the row is wide: the maxima of blocks of 16
    (one read of the row), the C blocks with the largest maxima, then the C largest of
    their 16 * C logits. Every logit above the C-th largest block maximum lies in those
    blocks, so the C largest gathered logits hold every logit above
    `bound = max(C-th block maximum, smallest candidate)`.
    """
    local_vocab = z.shape[-1]
    width = min(num_candidates, local_vocab)
    blocks = -(-local_vocab // _CANDIDATE_BLOCK)
    if not _two_level(local_vocab, width):  # a narrow row: one top-k over it costs about as much
        values, ids = lax.top_k(z, width)
        bound = jnp.min(values, axis=-1)  # == values[:, -1]; a slice would stop XLA:CPU's TopK kernel
    else:
        pad = blocks * _CANDIDATE_BLOCK - local_vocab
        window = (1, _CANDIDATE_BLOCK)  # a window over the [B, V] logits reads them in place
        maxima = lax.reduce_window(z, -jnp.inf, lax.max, window, window, ((0, 0), (0, pad)))  # [B, blocks]
        block_max, top_blocks = lax.top_k(maxima, width)  # [B, C]
        padded = jnp.pad(z, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        padded = padded.reshape(z.shape[0], blocks, _CANDIDATE_BLOCK)
        gathered = jnp.take_along_axis(padded, top_blocks[:, :, None], axis=1).reshape(z.shape[0], -1)
        values, position = lax.top_k(gathered, width)  # [B, C] of [B, 16 C]
        block = jnp.take_along_axis(top_blocks, position // _CANDIDATE_BLOCK, axis=-1)
        ids = block * _CANDIDATE_BLOCK + position % _CANDIDATE_BLOCK
        bound = jnp.maximum(jnp.min(values, axis=-1), jnp.min(block_max, axis=-1))
    ids = (ids + shards.offset(local_vocab)).astype(jnp.int32)
    if shards.sharded:  # the row's top C are among the devices' top Cs
        local_bound = bound
        values, best = lax.top_k(shards.gather(values), min(num_candidates, shards.size(local_vocab)))
        ids = jnp.take_along_axis(shards.gather(ids), best, axis=-1)
        bound = jnp.maximum(jnp.min(values, axis=-1), shards.max(local_bound[:, None]))
    return values, ids, bound


def _exact_candidate_rule(z, row_max, total_mass, params, num_candidates, shards=LOCAL):
    """The rule from the candidates and where it is provably the whole row's: (candidate rule,
    exact, candidates, their ids, bound, inside) as in `Truncation`.

    On wide local rows the candidates come in two widths: first C/2 (`lax.top_k`'s cost on
    XLA:CPU grows with k: the C/2 search costs about half), then, only when some row's rule
    is not proven by those, all C (skipped where a row's top-p nucleus provably does not
    fit in C). The narrow set is padded to C with -inf (ids >= V)."""

    def at_width(width):
        rule, exact, inside, values, ids, bound = _candidate_rule(
            z, row_max, total_mass, params, width, shards
        )
        pad = ((0, 0), (0, num_candidates - values.shape[-1]))
        values = jnp.pad(values, pad, constant_values=-jnp.inf)
        ids = jnp.pad(ids, pad, constant_values=shards.size(z.shape[-1]))
        return rule, exact, values, ids, bound, inside

    narrow = num_candidates // 2
    if shards.sharded or not _two_level(z.shape[-1], num_candidates) or narrow < 1:
        return at_width(num_candidates)
    found = at_width(narrow)
    # The C largest logits hold at most the C/2 candidates' mass plus C - C/2 times the
    # mass at `bound`; a row whose top-p target exceeds that fails at C too: go to the
    # whole row (a policy: the whole row is exact in every case).
    exact, values, bound = found[1], found[2], found[4]
    rest = (num_candidates - narrow) * jnp.exp(bound - row_max)
    most_in_c = jnp.sum(jnp.exp(values - row_max[:, None]), -1) + rest  # [B]
    top_k, top_p = params[0], params[1]
    too_wide = (top_p < 1.0) & (top_k == 0) & (most_in_c < top_p * total_mass)
    widen = ~jnp.all(exact) & ~jnp.any(~exact & too_wide)
    return lax.cond(widen, lambda: at_width(num_candidates), lambda: found)


def _candidate_rule(z, row_max, total_mass, params, num_candidates, shards=LOCAL):
    """The rule computed on each row's candidates, and per row [B] whether it is provably the
    full-vocabulary rule (`exact`) and keeps only candidates (`inside`); then the candidates,
    their ids and bound (`_candidates`).

    Why it is exact: the rule's threshold is `max(t_k, min(max(t_p, t_min_p), t_keep))`.
    Each part computed on the candidates equals the full row's wherever either is above
    `bound` (everything above it is a candidate), given top-p's normaliser: the whole row's
    mass with top-k off, the top-k kept mass when top-k reaches only candidates above bound.
    As max/min commute with clamping at `bound`, a threshold above bound is then the full
    row's, and so is the typical band (the kept set, and so its entropy, is inside).
    """
    top_k, top_p, min_p, typical_p, min_keep = params
    values, ids, bound = _candidates(z, num_candidates, shards)
    rule, p_reached, t_p = _keep_rule(values, row_max, total_mass, *_rule_params(row_max, *params))
    bound_key = order_key(bound)
    above_bound = jnp.sum((values > bound[:, None]).astype(jnp.int32), axis=-1)  # [B]
    normaliser_exact = (top_p >= 1.0) | (top_k == 0) | (top_k <= above_bound)
    inside = (rule.threshold > bound_key) & normaliser_exact
    inside |= (bound == -jnp.inf) & p_reached  # the rest of the row is -inf: no mass
    # Exact also where the kept set reaches past the candidates, when every part of the
    # threshold is: the j-th largest value is the j-th candidate's while j <= the candidates
    # >= bound; top-p's crossing is exact when it lies at or above bound (the row has at least
    # the candidates' mass at bound); min-p needs only the row's maximum. Typical-p's entropy
    # needs the whole kept set, so it is exact only inside.
    at_or_above_bound = jnp.sum((values >= bound[:, None]).astype(jnp.int32), axis=-1)
    k_exact = (top_k == 0) | (top_k <= at_or_above_bound)
    keep_exact = (min_keep <= 1) | (min_keep <= at_or_above_bound)
    p_exact = (top_p >= 1.0) | (normaliser_exact & (t_p >= bound_key))
    parts_exact = k_exact & keep_exact & p_exact & (typical_p >= 1.0)
    keeps_everything = ~_filtering(params)
    return rule, inside | parts_exact | keeps_everything, inside, values, ids, bound


def _candidate_keep(logits, top_k, top_p, min_p, typical_p, num_candidates: int = 128, min_tokens_to_keep=1):
    """What the fast path alone would keep for `[B, V]` logits ([B, V] bool), and per row
    [B] whether that is provably the full-vocabulary rule's kept set (`truncate` takes the
    fast path iff every row is covered). Shows tests and benchmarks which path runs."""
    min_keep = jnp.broadcast_to(jnp.asarray(min_tokens_to_keep, jnp.int32), jnp.shape(top_k))
    z, row_max, _, params = _prepare(
        logits, top_k, top_p, min_p, typical_p, min_keep, logits.shape[-1], LOCAL
    )
    total_mass = jnp.sum(jnp.exp(z - row_max[:, None]), axis=-1)
    rule, exact, *_ = _candidate_rule(z, row_max, total_mass, params, num_candidates)
    return rule.keep(z), exact
