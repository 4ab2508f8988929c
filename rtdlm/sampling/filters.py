"""Exact truncation (top-k, top-p, min-p, typical-p, greedy) without sorting the vocabulary.

Every filter keeps the tokens at or above a threshold, so the whole truncation is a
per-row rule "keep `z >= t`" (typical-p adds a band `|z - c| <= r`). Thresholds are searched
on the float32 bit patterns mapped to order-preserving uint32 keys (`_largest_threshold`:
all pairs at once for narrow rows, radix select for wide ones), exact, ties kept.

Fast path: the searches run on the `num_candidates` largest logits of each row
(`lax.top_k`), which is exact whenever the kept set provably lies inside them (top-k <= C,
the top-p crossing reached inside the candidates, no ties straddling the last candidate).
Otherwise (`lax.cond`, whole batch) the same searches run on the full vocabulary.

Tie rule: tokens whose logit equals the threshold are all kept (top-k keeps ties with the
k-th value, top-p keeps ties with the crossing token); HF transformers breaks such ties by
sort order. On continuous logits the kept sets are identical.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of the uint32 key, high first
_PAIRWISE_MAX_WIDTH = 512  # rows up to this wide compare all pairs; wider: radix select
_MIN_KEY = jnp.uint32(0)


def order_key(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that `x < y` iff `key(x) < key(y)` (-inf lowest)."""
    bits = lax.bitcast_convert_type(x + 0.0, jnp.uint32)  # + 0.0 turns -0.0 into +0.0
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Largest t with `sum(weights[keys >= t]) >= target`, per row (exact; a key of a
    positive-weight element). keys, weights: [B, N]; target: [B]. If the target is
    unreachable, returns a key <= every key (callers check reachability themselves).

    Narrow rows (candidate sets, small vocabularies): all N thresholds at once, O(N^2)
    work but no loop. Wide rows (whole vocabularies): radix select, 3 histogram passes.
    """
    if keys.shape[-1] > _PAIRWISE_MAX_WIDTH:
        return _radix_select(keys, weights, target)
    return _pairwise_threshold(keys, weights, target)


def _pairwise_threshold(keys, weights, target):
    at_or_above = keys[:, None, :] >= keys[:, :, None]  # [B, N, N]: key i >= key j
    mass = jnp.sum(jnp.where(at_or_above, weights[:, None, :], 0.0), axis=-1)  # [B, N] per key j
    return jnp.max(jnp.where(mass >= target[:, None], keys, _MIN_KEY), axis=-1)


def _radix_select(keys, weights, target):
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
        by_typical = _typical_key(z, self.typical_center) >= self.typical_threshold[:, None]
        return by_value & by_typical


def _typical_key(z, center):
    return order_key(-jnp.abs(z - center[:, None]))


def _keep_rule(values, row_max, total_mass, top_k, top_p, min_p_key, typical_p):
    """Thresholds computed on `values` [B, N] (the whole row or its largest N logits).

    Returns the rule and, per row, whether the top-p crossing was reached inside `values`.
    `total_mass` [B] is the whole row's sum of exp(z - row_max) (top-p's normaliser when
    top-k is off).
    """
    keys = order_key(values)
    mass = jnp.exp(values - row_max[:, None])  # [B, N]; 0 for -inf

    def top_k_threshold():
        return jnp.where(top_k > 0, _largest_threshold(keys, jnp.ones_like(mass), top_k), _MIN_KEY)

    use_k = top_k > 0
    t_k = lax.cond(jnp.any(use_k), top_k_threshold, lambda: jnp.zeros_like(top_k, jnp.uint32))
    mass_k = jnp.where(keys >= t_k[:, None], mass, 0.0)
    kept_mass_k = jnp.sum(mass_k, axis=-1)
    normaliser = jnp.where(use_k, kept_mass_k, total_mass)  # top-p runs on the top-k renormalised
    target_p = top_p * normaliser
    use_p = top_p < 1.0
    t_p = lax.cond(
        jnp.any(use_p),
        lambda: jnp.where(use_p, _largest_threshold(keys, mass_k, target_p), _MIN_KEY),
        lambda: jnp.zeros_like(t_k),
    )
    p_reached = ~use_p | (kept_mass_k >= target_p)
    threshold = jnp.maximum(jnp.maximum(t_k, t_p), min_p_key)

    def typical():
        # Distance of -log q_i from the entropy H of the kept distribution q:
        # |-log q_i - H| = |z_i - center| with center = row_max + log Z - H.
        kept_mass = jnp.where(keys >= threshold[:, None], mass, 0.0)
        z_kept = jnp.sum(kept_mass, axis=-1)
        q = kept_mass / z_kept[:, None]
        log_q = jnp.where(q > 0, values - row_max[:, None] - jnp.log(z_kept)[:, None], 0.0)
        entropy = -jnp.sum(q * log_q, axis=-1)
        center = row_max + jnp.log(z_kept) - entropy
        t_typ = _largest_threshold(
            jnp.where(kept_mass > 0, _typical_key(values, center), _MIN_KEY),
            kept_mass,
            typical_p * z_kept,
        )
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
) -> jax.Array:
    """Applies top-k, top-p, min-p, typical-p (in that order) and greedy to `[B, V]` logits.

    Per-row parameters are `[B]` arrays (off: top_k 0, top_p 1, min_p 0, typical_p 1).
    Removed tokens become -inf. NaN logits count as -inf, +inf as the largest float; a row
    with no finite logit becomes all zeros (uniform; greedy picks token 0).

    Returns: [B, V] float32.
    """
    batch, vocab = logits.shape
    z = jnp.where(jnp.isnan(logits), -jnp.inf, logits.astype(jnp.float32))
    z = jnp.minimum(z, jnp.finfo(jnp.float32).max)
    z = jnp.where(jnp.max(z, axis=-1, keepdims=True) == -jnp.inf, 0.0, z)  # empty rows
    row_max = jnp.max(z, axis=-1)  # [B], finite
    total_mass = jnp.sum(jnp.exp(z - row_max[:, None]), axis=-1)

    top_k = jnp.where((top_k > 0) & (top_k < vocab), top_k, 0).astype(jnp.int32)
    top_p = jnp.clip(jnp.nan_to_num(top_p, nan=1.0), jnp.finfo(jnp.float32).tiny, 1.0)
    typical_p = jnp.clip(jnp.nan_to_num(typical_p, nan=1.0), jnp.finfo(jnp.float32).tiny, 1.0)
    min_p = jnp.clip(jnp.nan_to_num(min_p, nan=0.0), 0.0, 1.0)
    min_p_key = order_key(row_max + jnp.log(min_p))  # min-p relative to the top token
    params = (top_k, top_p, min_p_key, typical_p)

    num_candidates = min(num_candidates, vocab)
    if num_candidates == vocab:
        rule, _ = _keep_rule(z, row_max, total_mass, *params)
    else:
        candidates = lax.top_k(z, num_candidates)[0]  # [B, C], descending
        rule, p_reached = _keep_rule(candidates, row_max, total_mass, *params)
        # == candidates[:, -1]; slicing the top_k output would stop XLA on CPU from using its
        # TopK kernel (it falls back to sorting the whole row).
        last = jnp.min(candidates, axis=-1)
        every_finite_inside = last == -jnp.inf  # the rest of the row is -inf: no mass
        no_straddling_ties = jnp.sum(z >= last[:, None], axis=-1) == num_candidates
        kept_inside = rule.threshold >= order_key(last)
        covered = p_reached & (
            every_finite_inside
            | (no_straddling_ties & (top_k <= num_candidates) & ((typical_p >= 1.0) | kept_inside))
        )
        rule = lax.cond(
            jnp.all(covered),
            lambda: rule,
            lambda: _keep_rule(z, row_max, total_mass, *params)[0],
        )
    keep = rule.keep(z)
    iota = jnp.arange(vocab)
    first_max = jnp.min(jnp.where(z == row_max[:, None], iota, vocab), axis=-1)  # [B]
    keep = jnp.where(greedy[:, None], iota == first_max[:, None], keep)
    return jnp.where(keep, z, -jnp.inf)
