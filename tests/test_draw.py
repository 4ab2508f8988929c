"""The inverse-CDF draw never leaves the support, under any float rounding.

Regression for a bug where `u - before` rounded below zero after a block was picked and the
search inside the block returned offset 0, a token with no mass (1-2 draws in 10^6 at
V=32000). Here the uniforms are adversarial: every float32 value within many ulps of each
block boundary, 10^7 draws in all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.decoding import verify_drafts
from rtdlm.sampling import SamplingConfig, draw, sample
from rtdlm.sampling.sampler import _DRAW_BLOCK, _inverse_cdf

VOCAB = 32000


def half_removed_logits(seed=42):
    """[V] log-softmax logits with half the vocabulary at -inf, including every block's
    first token (the offset the old search fell back to)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    removed = rng.permutation(VOCAB)[: VOCAB // 2]
    logits[removed] = -np.inf
    logits[::_DRAW_BLOCK] = -np.inf
    logits[_DRAW_BLOCK - 1 :: _DRAW_BLOCK] = 3.0  # mass right before each boundary
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))


@jax.jit
def draw_each(uniforms, weights):
    """[N] uniforms against one [V] weight row -> [N] tokens (the row's sums computed once)."""
    return jax.vmap(lambda u: _inverse_cdf(u[None], weights[None])[0])(uniforms)


def boundary_uniforms(weights, ulps):
    """Every float32 uniform within `ulps` ulps of u * total == each block's cumulative end."""
    block_mass = jnp.sum(jnp.pad(weights, (0, -VOCAB % _DRAW_BLOCK)).reshape(-1, _DRAW_BLOCK), axis=-1)
    block_end = np.asarray(jnp.cumsum(block_mass))  # float32, as the draw computes it
    centres = (block_end / block_end[-1]).astype(np.float32)
    steps = np.arange(-ulps, ulps, dtype=np.int32)
    bits = centres.view(np.int32)[:, None] + steps[None]  # adjacent floats, both sides
    uniforms = bits.view(np.float32).reshape(-1)
    return uniforms[(uniforms >= 0) & (uniforms < 1)]


@pytest.mark.slow
def test_adversarial_uniforms_never_draw_a_removed_token():
    weights = jnp.exp(jnp.asarray(half_removed_logits()))
    uniforms = boundary_uniforms(weights, ulps=40_000)  # 125 boundaries x 80k = 10^7
    assert uniforms.size >= 9_900_000
    has_mass = np.asarray(weights) > 0
    for chunk in np.array_split(uniforms, 10):
        tokens = np.asarray(draw_each(jnp.asarray(chunk), weights))
        assert has_mass[tokens].all(), tokens[~has_mass[tokens]][:10]


def test_uniforms_at_the_edges_stay_on_the_support():
    weights = jnp.exp(jnp.asarray(half_removed_logits()))
    edges = np.array([0.0, np.float32(1e-30), np.nextafter(np.float32(1), np.float32(0))], np.float32)
    tokens = np.asarray(draw_each(jnp.asarray(edges), weights))
    positive = np.flatnonzero(np.asarray(weights) > 0)
    assert tokens[0] == tokens[1] == positive[0]
    assert tokens[2] == positive[-1]


def test_the_reported_repro_draws_only_kept_tokens():
    """The issue's repro: 10^5 jitted, vmapped `sample` draws over half-removed logits."""
    logits = jnp.asarray(half_removed_logits())
    config = SamplingConfig()
    tokens = jax.jit(jax.vmap(lambda k: sample(k, logits, config).token_id))(
        jax.random.split(jax.random.key(1000), 100_000)
    )
    assert np.isfinite(np.asarray(logits)[np.asarray(tokens)]).all()


def test_draw_with_zero_weight_runs_across_blocks():
    """Rows whose mass sits in a few isolated tokens: every draw is one of them."""
    rng = np.random.default_rng(0)
    weights = np.zeros((64, 4 * _DRAW_BLOCK + 3), np.float32)
    for row in weights:
        row[rng.choice(row.size, size=rng.integers(1, 5), replace=False)] = rng.random(4)[0] + 1e-3
    keys = jax.random.split(jax.random.key(1), 2000)
    draw_rows = jax.jit(jax.vmap(lambda k: draw(jax.random.split(k, 64), jnp.asarray(weights))))
    tokens = np.asarray(draw_rows(keys))
    assert (weights[np.arange(64)[None], tokens] > 0).all()


# ---- verify_drafts ---------------------------------------------------------------------------
def test_residual_draw_never_returns_a_token_without_residual_mass():
    """p and q agree on most tokens (residual 0 there), including every block's first."""
    rng = np.random.default_rng(3)
    batch, k, vocab = 512, 2, 4 * _DRAW_BLOCK
    q = rng.gamma(1.0, size=(batch, k, vocab))
    q /= q.sum(-1, keepdims=True)
    p = np.concatenate([q, q[:, :1]], axis=1).copy()  # p_j == q_j: residual 0 everywhere ...
    extra = rng.choice(np.setdiff1d(np.arange(vocab), np.arange(0, vocab, _DRAW_BLOCK)), 8, replace=False)
    p[:, :, extra] *= 3.0  # ... except at a few tokens
    p /= p.sum(-1, keepdims=True)
    drafts = jnp.asarray(np.argmin(p[:, :k] / q, axis=-1), jnp.int32)  # likely rejected
    verify = jax.jit(verify_drafts)
    for seed in range(200):  # 10^5 rows
        accept, resample = jax.random.split(jax.random.key(seed))
        num_accepted, token = verify(
            jax.random.split(accept, batch),
            jax.random.split(resample, batch),
            jnp.asarray(p, jnp.float32),
            jnp.asarray(q, jnp.float32),
            drafts,
        )
        num_accepted, token = np.asarray(num_accepted), np.asarray(token)
        rows = np.arange(batch)
        residual = np.where(
            (num_accepted < k)[:, None],
            np.maximum(p[rows, num_accepted] - q[rows, np.minimum(num_accepted, k - 1)], 0),
            p[rows, k],
        )
        assert (residual[rows, token] > 0).all()


@pytest.mark.parametrize("bad", [-1, 6, 2**30])
def test_out_of_vocabulary_drafts_are_rejected_and_the_token_follows_p(bad):
    rng = np.random.default_rng(4)
    batch, vocab = 100_000, 6
    p = rng.gamma(1.0, size=(2, vocab))
    p /= p.sum(-1, keepdims=True)
    q = np.full((1, vocab), 1.0 / vocab)  # any q: the draft was not drawn from it
    accept, resample = jax.random.split(jax.random.key(5))
    num_accepted, token = jax.jit(verify_drafts)(
        jax.random.split(accept, batch),
        jax.random.split(resample, batch),
        jnp.broadcast_to(jnp.asarray(p, jnp.float32), (batch, 2, vocab)),
        jnp.broadcast_to(jnp.asarray(q, jnp.float32), (batch, 1, vocab)),
        jnp.full((batch, 1), bad, jnp.int32),
    )
    assert (np.asarray(num_accepted) == 0).all()
    token = np.asarray(token)
    assert ((token >= 0) & (token < vocab)).all()
    frequency = np.bincount(token, minlength=vocab) / batch
    assert (np.abs(frequency - p[0]) <= 4.5 * np.sqrt(p[0] * (1 - p[0]) / batch)).all(), (frequency, p[0])
