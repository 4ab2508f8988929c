"""The sampler's candidate path: the two-level candidate search and the draw among candidates.

`filters._candidates` finds each row's C largest logits from block maxima (no top-k over the
whole row) and a `bound` above which every logit is a candidate; `sampler.sample_truncation`
draws among the candidates for rows whose kept set lies inside them, and from the whole row
otherwise. Checked against NumPy (exact values, the bound property) and, for the draw, by
chi-square tests over 2 x 10^5 draws per row, and for per-row independence of the paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import stats

from rtdlm.sampling import SamplingConfig, filters, process_logits, sample, sampler


def _rows(kind: str, batch: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (3.0 * rng.standard_normal((batch, vocab))).astype(np.float32)
    if kind == "integer-ties":  # few distinct values: ties everywhere, also across blocks
        return rng.integers(-3, 4, (batch, vocab)).astype(np.float32)
    if kind == "bf16":
        return (3.0 * rng.standard_normal((batch, vocab))).astype(jnp.bfloat16).astype(np.float32)
    if kind == "clustered":  # the largest logits packed into a few neighbouring blocks
        x = rng.standard_normal((batch, vocab)).astype(np.float32)
        x[:, 100:160] += 10.0
        return x
    if kind == "few-finite":
        x = np.full((batch, vocab), -np.inf, np.float32)
        x[:, rng.choice(vocab, 5, replace=False)] = rng.standard_normal((batch, 5))
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "integer-ties", "bf16", "clustered", "few-finite"])
@pytest.mark.parametrize(("vocab", "width"), [(1000, 8), (32000, 128)])  # both take two levels
def test_candidates_are_the_largest_logits_and_bound_covers_the_rest(kind, vocab, width):
    z = _rows(kind, 4, vocab, seed=vocab + width)
    values, ids, bound = jax.jit(filters._candidates, static_argnums=1)(jnp.asarray(z), width)
    values, ids, bound = np.asarray(values), np.asarray(ids), np.asarray(bound)
    for b in range(z.shape[0]):
        np.testing.assert_array_equal(values[b], -np.sort(-z[b])[:width])  # exact, descending
        valid = ids[b] < vocab
        np.testing.assert_array_equal(z[b, ids[b][valid]], values[b][valid])  # ids match values
        assert len(set(ids[b].tolist())) == width  # no token twice
        above = np.flatnonzero(z[b] > bound[b])
        assert set(above.tolist()) <= set(ids[b].tolist())  # every logit above bound is a candidate


def _spy_whole_row_draws(monkeypatch):
    """Records the width of every inverse-CDF draw that actually runs (candidates: C wide;
    the whole row: V wide)."""
    widths: list[int] = []
    original = sampler._inverse_cdf

    def spy(u, weights):
        width = weights.shape[-1]
        jax.debug.callback(lambda: widths.append(width))
        return original(u, weights)

    monkeypatch.setattr(sampler, "_inverse_cdf", spy)
    return widths


def _spy_rejection(monkeypatch):
    """Records the number of rows `_draw_by_rejection` draws for, each time it runs."""
    active_rows: list[int] = []
    original = sampler._draw_by_rejection

    def spy(keys, u, t, active):
        jax.debug.callback(lambda n: active_rows.append(int(n)), jnp.sum(active))
        return original(keys, u, t, active)

    monkeypatch.setattr(sampler, "_draw_by_rejection", spy)
    return active_rows


def test_peaked_rows_draw_among_candidates_and_flat_rows_by_rejection(monkeypatch):
    widths = _spy_whole_row_draws(monkeypatch)
    rejections = _spy_rejection(monkeypatch)
    peaked = _rows("normal", 2, 32000, seed=1) * 2.0  # the 0.9 nucleus: a few tokens
    flat = _rows("normal", 2, 32000, seed=2) / 3.0  # the nucleus: thousands of tokens
    config = SamplingConfig(temperature=0.7, top_p=0.9)
    draw = jax.jit(lambda key, x: sample(key, x, config).token_id)
    jax.block_until_ready(draw(jax.random.key(0), peaked))
    jax.effects_barrier()
    assert widths == [128] and rejections == [], (widths, rejections)
    widths.clear()
    jax.block_until_ready(draw(jax.random.key(0), np.concatenate([peaked[:1], flat[:1]])))
    jax.effects_barrier()
    # the flat row alone draws by rejection; no whole-row draw unless its draw was ambiguous
    assert widths[0] == 128 and rejections == [1] and set(widths[1:]) <= {32000}, (widths, rejections)


def test_a_rows_token_does_not_depend_on_the_other_rows_path():
    # Row 0 lies on its candidates; its neighbour either does too or needs the whole row.
    peaked = _rows("normal", 1, 32000, seed=3) * 2.0
    flat = _rows("normal", 1, 32000, seed=4) / 3.0
    config = SamplingConfig(temperature=0.7, top_p=0.9, seed=jnp.array([7, 8]))  # per-row keys
    draw = jax.jit(jax.vmap(lambda key, x: sample(key, x, config).token_id, in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(5), 2000)
    with_peaked = np.asarray(draw(keys, np.concatenate([peaked, peaked * 1.1])))
    with_flat = np.asarray(draw(keys, np.concatenate([peaked, flat])))
    np.testing.assert_array_equal(with_peaked[:, 0], with_flat[:, 0])


CHI_SQUARE_CASES = {
    # name: (config, logits maker); every row's distribution is tested separately
    "top-k + top-p + min-p on candidates": (
        SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, min_p=0.01),
        lambda: _rows("normal", 3, 32000, seed=10),  # two-level candidates
    ),
    "top-p past the candidates (whole row)": (
        SamplingConfig(temperature=1.0, top_p=0.5),
        lambda: _rows("normal", 2, 4096, seed=11) / 6.0,
    ),
    "top-p and min-p past the candidates (rejection), integer ties": (
        SamplingConfig(temperature=1.0, top_p=jnp.array([0.7, 0.95]), min_p=jnp.array([0.0, 0.3])),
        lambda: _rows("integer-ties", 2, 4096, seed=13) / 2.0,
    ),
    "ties at the bound (bf16 values)": (
        SamplingConfig(temperature=1.0, top_k=20, typical_p=0.9),
        lambda: _rows("bf16", 2, 4096, seed=12),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHI_SQUARE_CASES))
def test_draws_follow_the_exact_distribution(name):
    config, make = CHI_SQUARE_CASES[name]
    logits = jnp.asarray(make())
    draws = 200_000
    expected = np.asarray(jax.nn.softmax(process_logits(logits, config), axis=-1), np.float64)  # [B, V]
    keys = jax.random.split(jax.random.key(2024), draws)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, config).token_id))(keys))  # [N, B]
    for b in range(logits.shape[0]):
        kept = np.flatnonzero(expected[b] > 0)
        counts = np.bincount(tokens[:, b], minlength=logits.shape[1])
        assert counts[expected[b] == 0].sum() == 0, "drew a removed token"
        # pool the rarest kept tokens so every cell expects >= 5 draws
        order = kept[np.argsort(expected[b, kept])]
        p, c = expected[b, order] * draws, counts[order]
        small = p < 5
        cells_p = np.append(p[~small], p[small].sum()) if small.any() else p
        cells_c = np.append(c[~small], c[small].sum()) if small.any() else c
        _, p_value = stats.chisquare(cells_c, cells_p * cells_c.sum() / cells_p.sum())
        assert p_value > 1e-4, (name, b, p_value, len(kept))


def _assert_follows(tokens, expected, name):
    """Chi-square of [N] draws against the distribution `expected` [V] (rare tokens pooled)."""
    draws = tokens.size
    kept = np.flatnonzero(expected > 0)
    counts = np.bincount(tokens.ravel(), minlength=expected.size)
    assert counts[expected == 0].sum() == 0, f"{name}: drew a removed token"
    order = kept[np.argsort(expected[kept])]
    p, c = expected[order] * draws, counts[order]
    small = p < 5
    cells_p = np.append(p[~small], p[small].sum()) if small.any() else p
    cells_c = np.append(c[~small], c[small].sum()) if small.any() else c
    _, p_value = stats.chisquare(cells_c, cells_p * cells_c.sum() / cells_p.sum())
    assert p_value > 1e-4, (name, p_value, len(kept))


@pytest.mark.slow
@pytest.mark.parametrize("slack", [0.03, 0.5])
def test_undecided_rejection_draws_are_decided_exactly_by_the_rule(monkeypatch, slack):
    # A huge rounding slack leaves many rejection draws ambiguous: the rule decides them, on
    # the few rows alone (slack 0.03: rarely more than one row in a batch of 8) or on the
    # whole batch (0.5: most draws). Either way the draws follow the kept distribution exactly.
    # Outside `vmap` (one batch per key, `lax.map`), so the branches really are taken.
    monkeypatch.setattr(sampler, "_mass_rounding_bound", lambda vocab: slack)
    decided_rows: list[int] = []
    original = sampler._decide

    def spy(t, *args):
        rows = t.logits.shape[0]
        jax.debug.callback(lambda: decided_rows.append(rows))
        return original(t, *args)

    monkeypatch.setattr(sampler, "_decide", spy)
    row = _rows("normal", 1, 4096, seed=40) / 6.0  # flat: the 0.6 nucleus is ~1500 tokens
    logits = jnp.asarray(np.repeat(row, 8, axis=0))
    config = SamplingConfig(top_p=0.6, min_p=0.2)
    keys = jax.random.split(jax.random.key(41), 12_500)
    tokens = np.asarray(jax.jit(lambda ks: lax.map(lambda k: sample(k, logits, config).token_id, ks))(keys))
    jax.effects_barrier()
    expected = np.asarray(jax.nn.softmax(process_logits(logits, config)[0]), np.float64)
    _assert_follows(tokens, expected, f"slack {slack}")
    assert (sampler._RULE_ROWS if slack < 0.1 else 8) in decided_rows, set(decided_rows)


def test_probability_and_logprob_match_the_processed_distribution():
    logits = jnp.asarray(
        np.concatenate([_rows("normal", 2, 4096, seed=20), _rows("normal", 1, 4096, seed=21) / 6])
    )
    config = SamplingConfig(temperature=0.9, top_p=0.8, num_top_tokens=5)
    result = jax.jit(lambda k: sample(k, logits, config))(jax.random.key(3))
    probs = np.asarray(jax.nn.softmax(process_logits(logits, config), axis=-1))
    token = np.asarray(result.token_id)
    chosen = probs[np.arange(3), token]
    np.testing.assert_allclose(np.asarray(result.probability), chosen, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(result.logprob), np.log(chosen), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.all_probabilities), probs, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.top_probabilities), -np.sort(-probs)[:, :5], rtol=1e-5)


def test_greedy_rows_and_empty_rows():
    logits = _rows("normal", 3, 4096, seed=30)
    logits[1, 17] = logits[1, 99] = logits[1].max() + 1.0  # tied maxima: the first wins
    logits[2] = -np.inf  # nothing finite: uniform; greedy picks token 0
    config = SamplingConfig(temperature=jnp.array([0.0, 0.0, 1.0]), top_k=jnp.array([5, 0, 5]))
    result = jax.jit(lambda k: sample(k, jnp.asarray(logits), config))(jax.random.key(0))
    assert int(result.token_id[0]) == int(np.argmax(logits[0])) and int(result.token_id[1]) == 17
    np.testing.assert_allclose(np.asarray(result.probability)[:2], 1.0)
    np.testing.assert_allclose(np.asarray(result.logprob)[:2], 0.0)
    assert np.isfinite(np.asarray(result.probability)).all()
    empty = jax.jit(jax.vmap(lambda k: sample(k, jnp.asarray(logits[2]), SamplingConfig()).token_id))(
        jax.random.split(jax.random.key(1), 20_000)
    )
    assert len(np.unique(np.asarray(empty))) > 3000  # spread over the vocabulary
