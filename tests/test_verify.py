"""Tests of `rtdlm.decoding.verify_drafts` on hand-made target (p) and draft (q) distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov_reference import chisquare_pvalue

from rtdlm.decoding import verify_drafts

P_MIN = 1e-4
BATCH, K, VOCAB = 2048, 3, 6  # unit tests share one compiled shape
STAT_ROWS = 200_000
verify = jax.jit(verify_drafts)


def f32(x):
    return jnp.asarray(x, jnp.float32)


def keys(seed, rows):
    accept, resample = jax.random.split(jax.random.key(seed))
    return jax.random.split(accept, rows), jax.random.split(resample, rows)


def random_distributions(rng, shape, zero_fraction=0.0):
    """Dirichlet-like rows over the last axis, with some entries exactly zero (never all)."""
    weights = rng.gamma(1.0, size=shape)
    if zero_fraction:
        zero = rng.random(shape) < zero_fraction
        zero[..., 0] &= ~np.all(zero, axis=-1)  # keep each row non-empty
        weights = np.where(zero, 0.0, weights)
    return weights / weights.sum(-1, keepdims=True)


def draw_drafts(seed, q):
    """drafts[b, j] ~ q[b, j] ([B, K, V]) -> [B, K] int32, by inverse CDF in NumPy."""
    q = np.asarray(q, np.float64)
    cdf = np.cumsum(q, axis=-1)
    u = np.random.default_rng(seed).random(q.shape[:-1]) * cdf[..., -1]
    drafts = np.sum(cdf <= u[..., None], axis=-1)
    return jnp.asarray(np.minimum(drafts, q.shape[-1] - 1), jnp.int32)


def emitted(drafts, num_accepted, next_token):
    """[B, K+1]: the accepted drafts, then the next token, then `V` (= nothing) after it."""
    drafts, num_accepted, next_token = map(np.asarray, (drafts, num_accepted, next_token))
    batch, k = drafts.shape
    slot = np.arange(k + 1)
    out = np.where(slot < num_accepted[:, None], np.pad(drafts, ((0, 0), (0, 1))), -1)
    out = np.where(slot == num_accepted[:, None], next_token[:, None], out)
    return out


def exact_emitted_joint(p, q):
    """Exact distribution of `emitted` ([V+1] * (K+1), index V = nothing) for position-wise
    independent p [K+1, V] and q [K, V]: accepted x_j with prob min(p_j, q_j)(x_j), then the
    residual max(0, p_a - q_a) at the first rejection a, or the bonus p_K."""
    k1, vocab = p.shape
    k = k1 - 1
    joint = np.zeros((vocab + 1,) * k1)
    accepted = np.minimum(p[:k], q)  # [K, V]
    for a in range(k + 1):
        last = np.maximum(p[a] - q[a], 0.0) if a < k else p[k]
        cells = np.ones(())
        for j in range(a):
            cells = np.multiply.outer(cells, accepted[j])
        cells = np.multiply.outer(cells, last)  # [V] * (a + 1)
        index = tuple([slice(0, vocab)] * (a + 1) + [vocab] * (k - a))
        joint[index] = cells
    return joint


# ---------------------------------------------------------------------------------------
# Unit tests on hand-made distributions.


def test_draft_equal_to_target_accepts_everything():
    rng = np.random.default_rng(0)
    batch, k, vocab = BATCH, K, VOCAB
    p = random_distributions(rng, (batch, k + 1, vocab), zero_fraction=0.3)
    drafts = draw_drafts(1, p[:, :k])
    num_accepted, next_token = verify(*keys(2, batch), f32(p), f32(p[:, :k]), drafts)
    np.testing.assert_array_equal(np.asarray(num_accepted), k)
    bonus = p[np.arange(batch), k, np.asarray(next_token)]
    assert np.all(bonus > 0)  # the bonus token is drawn from p_{K+1}
    assert num_accepted.dtype == jnp.int32 and num_accepted.shape == next_token.shape == (batch,)


@pytest.mark.parametrize("reject_at", [0, 1, 2])
def test_zero_target_probability_rejects(reject_at):
    rng = np.random.default_rng(reject_at)
    batch, k, vocab = BATCH, K, VOCAB
    q = random_distributions(rng, (batch, k, vocab))
    drafts = np.asarray(draw_drafts(3, q))
    p = random_distributions(rng, (batch, k + 1, vocab))
    p[:, :reject_at] = q[:, :reject_at]  # earlier drafts: p == q, always accepted
    rows = np.arange(batch)
    p[rows, reject_at, drafts[:, reject_at]] = 0.0  # p(x) = 0 at the rejected draft
    p /= p.sum(-1, keepdims=True)
    num_accepted, next_token = verify(*keys(4, batch), f32(p), f32(q), jnp.asarray(drafts))
    np.testing.assert_array_equal(np.asarray(num_accepted), reject_at)
    next_token = np.asarray(next_token)
    assert np.all(next_token != drafts[:, reject_at])
    # The replacement comes from the residual max(0, p - q): never a token where p <= q.
    assert np.all(p[rows, reject_at, next_token] > q[rows, reject_at, next_token])


def test_greedy_one_hot_accepts_iff_equal():
    rng = np.random.default_rng(5)
    batch, k, vocab = BATCH, K, VOCAB
    target = rng.integers(0, vocab, size=(batch, k + 1))
    drafts = np.where(rng.random((batch, k)) < 0.6, target[:, :k], rng.integers(0, vocab, size=(batch, k)))
    p = np.eye(vocab, dtype=np.float32)[target]
    q = np.eye(vocab, dtype=np.float32)[drafts]
    num_accepted, next_token = verify(*keys(6, batch), f32(p), f32(q), jnp.asarray(drafts, jnp.int32))
    matches = np.cumprod(drafts == target[:, :k], axis=1).sum(1)
    np.testing.assert_array_equal(np.asarray(num_accepted), matches)
    # The next token is the target's argmax at the first mismatch (or the bonus position).
    np.testing.assert_array_equal(np.asarray(next_token), target[np.arange(batch), matches])
    assert len(set(matches.tolist())) == k + 1  # every outcome 0..K occurred


# ---------------------------------------------------------------------------------------
# Statistical: the emitted tokens follow p exactly.


def verify_statistics(p, q, rows, seed):
    """Runs verification on `rows` rows sharing p [K+1, V] and q [K, V]; returns `emitted`."""
    k = q.shape[0]
    q_rows = np.broadcast_to(q, (rows, *q.shape))
    drafts = draw_drafts(seed, q_rows)
    p32 = jnp.broadcast_to(f32(p), (rows, *p.shape))
    num_accepted, next_token = verify(*keys(seed + 1, rows), p32, f32(q_rows), drafts)
    assert np.asarray(num_accepted).min() >= 0 and np.asarray(num_accepted).max() <= k
    return emitted(drafts, num_accepted, next_token)


def pair(k, vocab, seed):
    """p [K+1, V] and q [K, V], overlapping but with zeros on both sides: at every position
    the target's favourite is never drafted, and the first draft may propose a token the
    target never emits."""
    rng = np.random.default_rng(seed)
    p = random_distributions(rng, (k + 1, vocab))
    p[0, np.argmin(p[0])] = 0.0
    p /= p.sum(-1, keepdims=True)
    q = 0.5 * p[:k] + 0.5 * random_distributions(rng, (k, vocab))
    q[np.arange(k), np.argmax(p[:k], axis=-1)] = 0.0
    q[0, np.argmin(p[0])] += 0.1
    q /= q.sum(-1, keepdims=True)
    return p, q


def test_first_token_follows_target_k1():
    p, q = pair(1, VOCAB, seed=7)
    assert np.any((p[0] == 0) & (q[0] > 0)) and np.any((q[0] == 0) & (p[0] > 0))
    out = verify_statistics(p, q, rows=STAT_ROWS, seed=8)
    pvalue = chisquare_pvalue(out[:, :1], p[0])
    print(f"verify K=1 first token: chi-square p = {pvalue:.4g}")
    assert pvalue > P_MIN


def test_emitted_joint_k3():
    k, vocab = K, VOCAB
    p, q = pair(k, vocab, seed=9)
    out = verify_statistics(p, q, rows=STAT_ROWS, seed=10)
    first = chisquare_pvalue(out[:, :1], p[0])
    counts = np.bincount((out >= 0).sum(1) - 1, minlength=k + 1)
    assert np.all(counts > 1000), counts  # every acceptance count 0..K is well represented
    joint = exact_emitted_joint(p, q)
    whole = chisquare_pvalue(np.where(out < 0, vocab, out), joint)
    print(f"verify K=3 first token: p = {first:.4g}; joint of (accepted prefix, next token): p = {whole:.4g}")
    assert first > P_MIN and whole > P_MIN
    # Where the target fixes each position's distribution, every emitted position follows it.
    for j in range(1, k + 1):
        present = out[:, j] >= 0
        pvalue = chisquare_pvalue(out[present, j : j + 1], p[j])
        assert pvalue > P_MIN, (j, pvalue)


def test_rows_are_verified_independently():
    """Two different (p, q) pairs interleaved in one batch: each row follows its own p."""
    k, vocab, rows = K, VOCAB, STAT_ROWS
    (p_a, q_a), (p_b, q_b) = pair(k, vocab, seed=11), pair(k, vocab, seed=12)
    even = np.arange(rows) % 2 == 0
    p = np.where(even[:, None, None], p_a, p_b)
    q = np.where(even[:, None, None], q_a, q_b)
    drafts = draw_drafts(13, q)
    num_accepted, next_token = verify(*keys(14, rows), f32(p), f32(q), drafts)
    out = emitted(drafts, num_accepted, next_token)
    for mask, (p_x, q_x) in ((even, (p_a, q_a)), (~even, (p_b, q_b))):
        pvalue = chisquare_pvalue(np.where(out[mask] < 0, vocab, out[mask]), exact_emitted_joint(p_x, q_x))
        assert pvalue > P_MIN, pvalue
