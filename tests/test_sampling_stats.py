"""Statistical tests: drawn tokens follow the reference's processed distribution.

Draws come from `jax.vmap` of `sample` over keys (the logits are shared, so the processing
runs once and only the draw is batched); counts are compared with the NumPy reference's
probabilities by Pearson's chi-square (`scipy.stats.chisquare`), fixed seeds, and the
correct distribution must give p > 1e-4.

How small an error this catches: a 1-percentage-point error on a 0.3-probability token
(0.30 -> 0.31, the rest rescaled) gives a noncentrality of about 47 with 10^5 draws, which
p < 1e-4 rejects with ~96-99% power for the few cells used here; a 1% *relative* error
(0.300 -> 0.303) needs ~2x10^6 draws for the same power. Both are shown on the actual draws:
`test_*_has_power` feed the same counts a perturbed distribution and require rejection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import reference_process
from scipy import stats

from rtdlm.sampling import SamplingConfig, sample

ALPHA = 1e-4  # a correct sampler fails a single test with probability 1e-4
DRAWS = 100_000
CHUNK = 25_000  # keys per vmapped chunk: bounds the [chunk, B, 256] draw buffers


def draw_many(logits, config, num_draws, seed, token_history=None):
    """[num_draws, ...] token ids from independent keys (vmapped over chunks of keys)."""
    keys = jax.random.split(jax.random.key(seed), num_draws)

    @jax.jit
    def draws(keys, logits, config, token_history):
        one = lambda k: sample(k, logits, config, token_history).token_id
        return jax.lax.map(one, keys, batch_size=CHUNK)

    return np.asarray(draws(keys, jnp.asarray(logits), config, token_history))


def chi_square(counts, probabilities, min_expected=5.0):
    """Pearson chi-square p-value; cells with tiny expected counts are pooled into one."""
    counts = np.asarray(counts, np.float64)
    probabilities = np.asarray(probabilities, np.float64)
    total = counts.sum()
    removed = probabilities == 0
    assert counts[removed].sum() == 0, f"drew removed tokens {np.flatnonzero(removed & (counts > 0))}"
    expected = total * probabilities / probabilities.sum()
    small = ~removed & (expected < min_expected)
    large = ~removed & ~small
    observed = list(counts[large])
    expected_cells = list(expected[large])
    if small.any():
        observed.append(counts[small].sum())
        expected_cells.append(expected[small].sum())
    assert len(observed) >= 2
    return stats.chisquare(observed, expected_cells).pvalue


def perturbed(probabilities, token, delta):
    """`probabilities` with `delta` added to one token and the other kept tokens rescaled."""
    q = np.asarray(probabilities, np.float64).copy()
    others = np.arange(q.size) != token
    q[token] += delta
    q[others] *= (1.0 - q[token]) / q[others].sum()
    return q


def power(probabilities, q, num_draws):
    """Probability that the chi-square test rejects `probabilities` at ALPHA when data follow `q`."""
    p = np.asarray(probabilities)[np.asarray(probabilities) > 0]
    q = np.asarray(q)[np.asarray(probabilities) > 0]
    noncentrality = num_draws * np.sum((q - p) ** 2 / p)
    df = p.size - 1
    return stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, noncentrality)


# ---- one batch of per-row mixed configs ------------------------------------------------------
MIXED_VOCAB = 40


def _mixed_case():
    rng = np.random.default_rng(2026)
    logits = rng.normal(size=(6, MIXED_VOCAB)).astype(np.float32) * 1.5
    # row 0: a hand-made distribution with a 0.3 token (for the power test), temperature 1
    head = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.02])
    logits[0] = -np.inf
    logits[0, : head.size] = np.log(head)
    history = np.full((6, 10), -1, np.int32)
    history[4] = np.argsort(-logits[4])[[0, 0, 1, 2, 2, 2, 5, 9, 11, 30]]  # penalise likely tokens
    history[1, :3] = [0, 3, 3]  # a penalty of 1 (row 1): history has no effect
    params = dict(
        temperature=np.array([1.0, 0.7, 1.5, 1.0, 1.2, 0.0], np.float32),  # row 5 greedy
        top_k=np.array([0, 10, 0, 0, 0, 5], np.int32),
        top_p=np.array([1.0, 0.8, 1.0, 1.0, 0.95, 0.5], np.float32),
        min_p=np.array([0.0, 0.0, 0.05, 0.0, 0.0, 0.0], np.float32),
        typical_p=np.array([1.0, 1.0, 1.0, 0.8, 1.0, 1.0], np.float32),
        repetition_penalty=np.array([1.0, 1.0, 1.0, 1.0, 1.8, 1.0], np.float32),
        presence_penalty=np.array([0.0, 0.0, 0.0, 0.0, 0.3, 0.0], np.float32),
        frequency_penalty=np.array([0.0, 0.0, 0.0, 0.0, 0.2, 0.0], np.float32),
    )
    return logits, history, params


@pytest.fixture(scope="module")
def mixed_draws():
    logits, history, params = _mixed_case()
    tokens = draw_many(logits, SamplingConfig(**params), DRAWS, seed=1, token_history=jnp.asarray(history))
    reference = reference_process(logits, token_history=history, **params)
    counts = np.stack([np.bincount(tokens[:, b], minlength=MIXED_VOCAB) for b in range(tokens.shape[1])])
    return counts, reference


@pytest.mark.parametrize(
    "row",
    [0, 1, 2, 3, 4],
    ids=[
        "plain softmax",
        "temperature+top-k+top-p",
        "temperature+min-p",
        "typical-p",
        "repetition/presence/frequency penalties with history",
    ],
)
def test_per_row_mixed_configs_follow_the_reference(mixed_draws, row, record_property):
    counts, reference = mixed_draws
    assert counts[row].sum() == DRAWS
    assert reference.margin[row] > 1e-4  # the reference's kept set is not borderline
    p_value = chi_square(counts[row], reference.probabilities[row])
    record_property("chi2_p_value", float(p_value))
    print(f"row {row}: chi-square p = {p_value:.4g}")
    assert p_value > ALPHA


def test_greedy_row_in_a_mixed_batch(mixed_draws):
    counts, reference = mixed_draws
    assert reference.greedy[5]
    assert counts[5, np.argmax(reference.logits[5])] == DRAWS


def test_chi_square_has_power_against_one_percentage_point(mixed_draws):
    counts, reference = mixed_draws
    probabilities = reference.probabilities[0]
    assert probabilities[0] == pytest.approx(0.3, abs=1e-6)
    wrong = perturbed(probabilities, 0, 0.01)  # 0.30 -> 0.31
    assert power(probabilities, wrong, DRAWS) > 0.95
    p_value = chi_square(counts[0], wrong)
    print(f"perturbed 0.30 -> 0.31: chi-square p = {p_value:.3g}")
    assert p_value < ALPHA


# ---- a larger vocabulary: the two-level draw across blocks -----------------------------------
def test_large_vocabulary_unbatched_logits(record_property):
    vocab = 1000
    logits = (np.random.default_rng(7).normal(size=vocab) * 2.0).astype(np.float32)
    params = dict(temperature=0.9, top_p=0.95, top_k=600)
    tokens = draw_many(logits, SamplingConfig(**params), DRAWS, seed=2)
    assert tokens.shape == (DRAWS,)
    reference = reference_process(logits, **params)
    assert reference.margin > 1e-4
    assert (reference.probabilities > 0).sum() > 300  # the kept set spans several 256-blocks
    p_value = chi_square(np.bincount(tokens, minlength=vocab), reference.probabilities)
    record_property("chi2_p_value", float(p_value))
    print(f"V=1000 top-p: chi-square p = {p_value:.4g}")
    assert p_value > ALPHA


# ---- 2x10^6 draws of a truncated distribution ------------------------------------------------
CHAIN_DRAWS = 2_000_000


@pytest.fixture(scope="module")
def chain_draws():
    q = np.array([0.27, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01, 0.01])
    logits = (np.log(q) * 0.8).astype(np.float32)
    # top-k 9 drops the 3 least likely, top-p 0.93 (on the top-k renormalised distribution)
    # one more, min-p 0.18 one more: 7 tokens left, the most likely at ~0.297
    params = dict(temperature=0.8, top_k=9, top_p=0.93, min_p=0.18)
    tokens = draw_many(logits, SamplingConfig(**params), CHAIN_DRAWS, seed=3)
    reference = reference_process(logits, **params)
    return np.bincount(tokens, minlength=q.size), reference


@pytest.mark.slow
def test_truncated_chain_with_two_million_draws(chain_draws, record_property):
    counts, reference = chain_draws
    assert counts.sum() == CHAIN_DRAWS
    assert (reference.probabilities > 0).sum() == 7
    p_value = chi_square(counts, reference.probabilities)
    record_property("chi2_p_value", float(p_value))
    print(f"top-k+top-p+min-p, 2e6 draws: chi-square p = {p_value:.4g}")
    assert p_value > ALPHA


@pytest.mark.slow
def test_truncated_chain_has_power_against_one_percent(chain_draws):
    counts, reference = chain_draws
    probabilities = reference.probabilities
    top = int(np.argmax(probabilities))
    assert probabilities[top] == pytest.approx(0.3, abs=0.005)
    wrong = perturbed(probabilities, top, 0.01 * probabilities[top])  # 1% relative: 0.297 -> 0.300
    assert power(probabilities, wrong, CHAIN_DRAWS) > 0.99
    p_value = chi_square(counts, wrong)
    print(f"perturbed by 1% relative: chi-square p = {p_value:.3g}")
    assert p_value < ALPHA
