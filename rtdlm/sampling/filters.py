"""Exact truncation (top-k, top-p, min-p, typical-p, greedy) without sorting the vocabulary.

Every filter keeps the tokens at or above a threshold, so the whole truncation is a
per-row rule "keep `z >= t`" (typical-p adds a band `|z - c| <= r`). Thresholds are searched
on the float32 bit patterns mapped to order-preserving uint32 keys (`_largest_threshold`:
all pairs at once for narrow rows, radix select for wide ones), exact, ties kept.

Fast path: the searches run on the `num_candidates` largest logits of each row
(`lax.top_k`), which is exact whenever the candidates provably give the full row's
thresholds (`_candidate_rule`): top-k <= C and the top-p crossing reached inside the
candidates; ties of the last candidate's value outside the candidates (common with
bfloat16-valued logits) matter only where top-k and top-p both reach down to that value,
or typical-p's kept set does. Otherwise (`lax.cond`, whole batch) the same searches run on
the full vocabulary.

Tie rule: tokens whose logit equals the threshold are all kept (top-k keeps ties with the
k-th value, top-p keeps ties with the crossing token); HF transformers breaks such ties by
sort order. On continuous logits the kept sets are identical.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rtdlm.sampling.vocab import LOCAL, Vocab

_RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of the uint32 key, high first
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
    batch = keys.shape[0]
    rows = jnp.arange(batch)[:, None]
    prefix = jnp.zeros(batch, jnp.uint32)  # the threshold's bits decided so far
    above = jnp.zeros(batch, weights.dtype)  # mass of keys above every threshold with this prefix
    for shift, bits in _RADIX_DIGITS:
        size = 1 << bits
        digit = ((keys >> shift) & (size - 1)).astype(jnp.int32)
        high = shift + bits
        if high < 32:  # only keys sharing the decided prefix compete; the others are dropped
            digit = jnp.where((keys >> high) == (prefix >> high)[:, None], digit, size)
        hist = jnp.zeros((batch, size), weights.dtype).at[rows, digit].add(weights, mode="drop")
        hist = vocab.combine_sum(hist)
        at_or_above = jnp.cumsum(hist[:, ::-1], axis=-1)[:, ::-1]  # [B, size] mass of digits >= d
        reaches = above[:, None] + at_or_above >= target[:, None]  # True up to the answer
        best = jnp.maximum(jnp.sum(reaches, axis=-1) - 1, 0)  # [B]
        strictly_above = jnp.pad(at_or_above, ((0, 0), (0, 1)))[rows[:, 0], best + 1]
        above = above + strictly_above
        prefix = prefix | (best.astype(jnp.uint32) << shift)
    return prefix


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

    Returns the rule and, per row, whether the top-p crossing was reached inside `values`.
    `total_mass` [B] is the whole row's sum of exp(z - row_max) (top-p's normaliser when
    top-k is off).
    """
    keys = order_key(values)
    mass = jnp.exp(values - row_max[:, None])  # [B, N]; 0 for -inf

    def top_k_threshold():
        return jnp.where(top_k > 0, _largest_threshold(keys, jnp.ones_like(mass), top_k, vocab), _MIN_KEY)

    use_k = top_k > 0
    t_k = lax.cond(jnp.any(use_k), top_k_threshold, lambda: jnp.zeros_like(top_k, jnp.uint32))
    mass_k = jnp.where(keys >= t_k[:, None], mass, 0.0)
    kept_mass_k = vocab.sum(mass_k)
    normaliser = jnp.where(use_k, kept_mass_k, total_mass)  # top-p runs on the top-k renormalised
    target_p = top_p * normaliser
    use_p = top_p < 1.0
    t_p = lax.cond(
        jnp.any(use_p),
        lambda: jnp.where(use_p, _largest_threshold(keys, mass_k, target_p, vocab), _MIN_KEY),
        lambda: jnp.zeros_like(t_k),
    )
    p_reached = ~use_p | (kept_mass_k >= target_p)
    use_m = min_keep > 1
    t_m = lax.cond(  # the min_keep-th largest key: the most top-p and min-p may cut
        jnp.any(use_m),
        lambda: jnp.where(use_m, _largest_threshold(keys, jnp.ones_like(mass), min_keep, vocab), _MAX_KEY),
        lambda: jnp.full_like(t_k, _MAX_KEY),
    )
    threshold = jnp.maximum(t_k, jnp.minimum(jnp.maximum(t_p, min_p_key), t_m))

    def typical():
        # Distance of -log q_i from the entropy H of the kept distribution q:
        # |-log q_i - H| = |z_i - center| with center = row_max + log Z - H.
        kept_mass = jnp.where(keys >= threshold[:, None], mass, 0.0)
        z_kept = vocab.sum(kept_mass)
        q = kept_mass / z_kept[:, None]
        log_q = jnp.where(q > 0, values - row_max[:, None] - jnp.log(z_kept)[:, None], 0.0)
        entropy = -vocab.sum(q * log_q)
        center = row_max + jnp.log(z_kept) - entropy
        # Tokens kept by value whose mass underflows still have a distance (HF's log-softmax
        # is finite): they count for min_keep, and weigh nothing for the mass.
        kept = keys >= threshold[:, None]
        typical_keys = jnp.where(kept, _typical_key(values, center), _MIN_KEY)
        t_typ = _largest_threshold(typical_keys, kept_mass, typical_p * z_kept, vocab)
        t_typ_m = lax.cond(
            jnp.any(use_m),
            lambda: _largest_threshold(typical_keys, kept.astype(mass.dtype), min_keep, vocab),
            lambda: jnp.full_like(t_typ, _MAX_KEY),
        )
        t_typ = jnp.minimum(t_typ, jnp.where(use_m, t_typ_m, _MAX_KEY))
        return center, jnp.where(typical_p < 1.0, t_typ, _MIN_KEY)

    use_typical = typical_p < 1.0
    center, t_typ = lax.cond(
        jnp.any(use_typical), typical, lambda: (jnp.zeros_like(row_max), jnp.zeros_like(t_k))
    )
    return KeepRule(threshold, center, t_typ), p_reached


def truncate(
    logits: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    typical_p: jax.Array,
    greedy: jax.Array,
    num_candidates: int = 128,
    vocab_axis: str | None = None,
    min_tokens_to_keep: jax.Array | int = 1,
) -> jax.Array:
    """Applies top-k, top-p, min-p, typical-p (in that order) and greedy to `[B, V]` logits.

    Per-row parameters are `[B]` arrays (off: top_k 0, top_p 1, min_p 0, typical_p 1).
    `min_tokens_to_keep` ([B] or scalar, Hugging Face's): top-k keeps at least that many,
    top-p and min-p never cut below the min_tokens_to_keep-th largest logit, and typical-p
    keeps at least the min_tokens_to_keep tokens closest to the entropy.
    Removed tokens become -inf. NaN logits count as -inf, +inf as the largest float; a row
    with no finite logit becomes all zeros (uniform; greedy picks token 0).

    `vocab_axis`: inside `shard_map`, the mesh axis the vocabulary is split over; `logits`
    is then this device's `[B, V/n]` block, and only per-row scalars, the candidate sets
    and small histograms cross devices.

    Returns: [B, V] float32 (the local block when sharded).
    """
    shards = Vocab(vocab_axis)
    local_vocab = logits.shape[-1]
    vocab = shards.size(local_vocab)
    min_keep = jnp.broadcast_to(jnp.asarray(min_tokens_to_keep, jnp.int32), top_k.shape)
    z, row_max, params = _prepare(logits, top_k, top_p, min_p, typical_p, min_keep, vocab, shards)
    top_k, top_p, min_p, typical_p, _ = params
    filtering = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0) | (typical_p < 1.0)  # [B]

    def filtered():
        total_mass = shards.sum(jnp.exp(z - row_max[:, None]))
        if num_candidates >= vocab and not shards.sharded:
            return _keep_rule(z, row_max, total_mass, *_rule_params(row_max, *params))[0].keep(z)
        rule, covered = _candidate_rule(z, row_max, total_mass, params, num_candidates, shards)
        rule = lax.cond(
            jnp.all(covered),
            lambda: rule,
            lambda: _keep_rule(z, row_max, total_mass, *_rule_params(row_max, *params), shards)[0],
        )
        return rule.keep(z)

    # Rows without a filter keep everything; when no row has one, skip the threshold search.
    keep = lax.cond(jnp.any(filtering), filtered, lambda: jnp.ones(z.shape, bool))
    token_ids = shards.token_ids(local_vocab)

    def greedy_rows():  # keep only the first maximum
        first_max = shards.min(jnp.where(z == row_max[:, None], token_ids[None], vocab))  # [B]
        return jnp.where(greedy[:, None], token_ids[None] == first_max[:, None], keep)

    keep = lax.cond(jnp.any(greedy), greedy_rows, lambda: keep)
    return jnp.where(keep, z, -jnp.inf)


def _prepare(logits, top_k, top_p, min_p, typical_p, min_keep, vocab, shards):
    """float32 logits with NaN -> -inf, +inf -> max float, empty rows -> 0; [B] row max;
    the parameters clamped to their documented ranges."""
    z = jnp.where(jnp.isnan(logits), -jnp.inf, logits.astype(jnp.float32))
    z = jnp.minimum(z, jnp.finfo(jnp.float32).max)
    z = jnp.where((shards.max(z) == -jnp.inf)[:, None], 0.0, z)  # empty rows
    row_max = shards.max(z)  # [B], finite
    min_keep = jnp.clip(min_keep, 1, vocab).astype(jnp.int32)
    top_k = jnp.where(top_k > 0, jnp.maximum(top_k, min_keep), 0)  # Hugging Face's top-k rule
    top_k = jnp.where(top_k < vocab, top_k, 0).astype(jnp.int32)
    top_p = jnp.clip(jnp.nan_to_num(top_p, nan=1.0), jnp.finfo(jnp.float32).tiny, 1.0)
    typical_p = jnp.clip(jnp.nan_to_num(typical_p, nan=1.0), jnp.finfo(jnp.float32).tiny, 1.0)
    min_p = jnp.clip(jnp.nan_to_num(min_p, nan=0.0), 0.0, 1.0)
    return z, row_max, (top_k, top_p, min_p, typical_p, min_keep)


def _rule_params(row_max, top_k, top_p, min_p, typical_p, min_keep):
    min_p_key = order_key(row_max + jnp.log(min_p))  # min-p relative to the top token
    return top_k, top_p, min_p_key, typical_p, min_keep


def _candidate_rule(z, row_max, total_mass, params, num_candidates, shards=LOCAL):
    """The rule computed on each row's `num_candidates` largest logits, and per row [B]
    whether it provably keeps exactly what the full-vocabulary rule keeps."""
    top_k, top_p, _, typical_p, min_keep = params
    vocab = shards.size(z.shape[-1])
    candidates = lax.top_k(z, min(num_candidates, z.shape[-1]))[0]  # [B, C], descending
    if shards.sharded:  # the row's top C are among the devices' top Cs
        candidates = lax.top_k(shards.gather(candidates), min(num_candidates, vocab))[0]
    rule, p_reached = _keep_rule(candidates, row_max, total_mass, *_rule_params(row_max, *params))
    # == candidates[:, -1]; slicing the top_k output would stop XLA on CPU from using its
    # TopK kernel (it falls back to sorting the whole row).
    last = jnp.min(candidates, axis=-1)  # [B]
    width = candidates.shape[-1]
    above_last = jnp.sum((candidates > last[:, None]).astype(jnp.int32), axis=-1)  # [B]
    # Ties with `last` outside the candidates, the one [B, V] pass here (a float count:
    # exact below 2**24 and cheaper than an integer sum on CPU).
    no_outside_ties = shards.sum((z >= last[:, None]).astype(jnp.float32)) == width
    last_key = order_key(last)
    # (1) The k-th largest value is a candidate's whenever k <= C, ties or not, so the top-k
    # threshold is exact (and so is min_keep's). (2) Top-p's crossing, if reached inside the
    # candidates, is exact (above `last` the candidates hold the whole row; at `last` the
    # full row has at least their mass) given the right normaliser: the top-k kept mass misses the ties with
    # `last` outside the candidates only when top-k reaches down to `last`. (3) Typical-p's
    # entropy needs the whole kept set inside the candidates.
    k_exact = (top_k <= width) & (min_keep <= width)
    normaliser_exact = (top_p >= 1.0) | (top_k == 0) | (top_k <= above_last) | no_outside_ties
    kept_inside = (rule.threshold > last_key) | ((rule.threshold == last_key) & no_outside_ties)
    typical_exact = (typical_p >= 1.0) | kept_inside
    every_finite_inside = last == -jnp.inf  # the rest of the row is -inf: no mass
    covered = p_reached & (every_finite_inside | (k_exact & normaliser_exact & typical_exact))
    return rule, covered


def _candidate_keep(logits, top_k, top_p, min_p, typical_p, num_candidates: int = 128, min_tokens_to_keep=1):
    """What the fast path alone would keep for `[B, V]` logits ([B, V] bool), and per row
    [B] whether that is provably the full-vocabulary rule's kept set (`truncate` takes the
    fast path iff every row is covered). Shows tests and benchmarks which path runs."""
    min_keep = jnp.broadcast_to(jnp.asarray(min_tokens_to_keep, jnp.int32), jnp.shape(top_k))
    z, row_max, params = _prepare(logits, top_k, top_p, min_p, typical_p, min_keep, logits.shape[-1], LOCAL)
    total_mass = jnp.sum(jnp.exp(z - row_max[:, None]), axis=-1)
    rule, covered = _candidate_rule(z, row_max, total_mass, params, num_candidates)
    return rule.keep(z), covered
