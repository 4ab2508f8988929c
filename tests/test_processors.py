"""The processor chain against the independent NumPy float64 reference.

Each processor alone, then `process_logits` (the whole default chain) on many random
configs: `[V]` and `[B, V]` logits, V from 7 to 5000, per-row mixed configs. Kept sets must
be identical and probabilities within 1e-5. A float32 implementation may disagree with
float64 only where a decision sits within rounding of its boundary, so rows whose reference
margin is below `MARGIN` are left out of the exact comparison (and counted: they must stay
rare).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sampling_reference import reference_process, softmax, state_after_generating

from rtdlm.sampling import (
    DEFAULT_PROCESSORS,
    SamplingConfig,
    apply_logit_bias,
    apply_penalties,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_truncation,
    as_processor,
    chain,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    filter_typical_p,
    init_from_history,
    is_greedy,
    mask_banned_tokens,
    mask_eos_before_min_new_tokens,
    process_logits,
    token_counts,
)

MARGIN = 1e-5  # decisions closer than this to their boundary are float32 rounding territory
PROB_TOL = 1e-5
VOCABS = [7, 50, 300, 1000, 5000]

process_jit = jax.jit(process_logits)


def random_logits(rng: np.random.Generator, shape, scale: float | None = None) -> np.ndarray:
    """Continuous float32 logits, with a random spread (flat to peaked)."""
    scale = rng.choice([0.3, 1.0, 2.0, 4.0]) if scale is None else scale
    return (rng.normal(size=shape) * scale + rng.normal()).astype(np.float32)


def random_history(rng: np.random.Generator, batch: int, vocab: int, length: int = 12) -> np.ndarray:
    """[B, H] ids with repeats and -1 padding (some rows entirely padding)."""
    history = rng.integers(0, min(vocab, 20), size=(batch, length))
    history[rng.random((batch, length)) < 0.3] = -1
    history[0, :] = -1  # row 0: nothing seen (padding only) - token 0 must stay untouched
    return history.astype(np.int32)


def random_row_params(rng: np.random.Generator, vocab: int, batch: int | None) -> dict:
    """Random settings; per-row `[B]` arrays when `batch` is given, else scalars.

    Every field is always present, so one jitted function serves every draw of a shape.
    """
    n = 1 if batch is None else batch

    def pick(off, sampler, p_on=0.6):
        values = np.where(rng.random(n) < p_on, sampler(n), off)
        return values[0] if batch is None else values

    params = dict(
        temperature=pick(1.0, lambda m: rng.choice([0.0, 0.3, 0.7, 1.0, 1.5, 2.5], size=m), 0.8),
        top_k=pick(0, lambda m: rng.integers(1, vocab + 3, size=m)).astype(np.int32),
        top_p=pick(1.0, lambda m: rng.uniform(0.05, 1.0, size=m)).astype(np.float32),
        min_p=pick(0.0, lambda m: rng.uniform(0.0, 0.3, size=m), 0.4).astype(np.float32),
        typical_p=pick(1.0, lambda m: rng.uniform(0.2, 1.0, size=m), 0.4).astype(np.float32),
        repetition_penalty=pick(1.0, lambda m: rng.uniform(0.7, 2.0, size=m), 0.5).astype(np.float32),
        presence_penalty=pick(0.0, lambda m: rng.uniform(-1.0, 1.0, size=m), 0.4).astype(np.float32),
        frequency_penalty=pick(0.0, lambda m: rng.uniform(-0.5, 0.5, size=m), 0.4).astype(np.float32),
        do_sample=pick(True, lambda m: rng.random(m) < 0.8, 1.0).astype(bool),
    )
    params["temperature"] = np.asarray(params["temperature"], np.float32)
    return params


def compare_rows(processed, ref, rows=None) -> int:
    """Asserts identical kept sets and probabilities (rows with a safe margin). Returns the
    number of rows compared."""
    processed = np.atleast_2d(np.asarray(processed, np.float64))
    ref_logits = np.atleast_2d(ref.logits)
    margin = np.atleast_1d(ref.margin)
    rows = np.arange(processed.shape[0]) if rows is None else rows
    compared = 0
    for b in rows:
        if margin[b] < MARGIN:
            continue
        kept, ref_kept = np.isfinite(processed[b]), np.isfinite(ref_logits[b])
        assert not np.isnan(processed[b]).any()
        np.testing.assert_array_equal(
            kept,
            ref_kept,
            err_msg=f"row {b}: kept {np.flatnonzero(kept)[:20]} vs reference {np.flatnonzero(ref_kept)[:20]}",
        )
        np.testing.assert_allclose(softmax(processed[b]), softmax(ref_logits[b]), rtol=0, atol=PROB_TOL)
        np.testing.assert_allclose(processed[b][kept], ref_logits[b][kept], rtol=1e-5, atol=1e-5)
        compared += 1
    return compared


# ---- token counts and padding ----------------------------------------------------------------
def test_token_counts_ignores_padding():
    history = jnp.array([[-1, 0, 0, 3, -1], [-1, -1, -1, -1, -1], [4, 4, 4, 1, 0]])
    counts = np.asarray(token_counts(history, 6))
    expected = np.array([[2, 0, 0, 1, 0, 0], [0] * 6, [1, 1, 0, 0, 3, 0]])
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int32


def test_padding_never_penalises_token_zero():
    logits = jnp.asarray(np.array([[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 0.5, 0.0]], np.float32))
    config = SamplingConfig(repetition_penalty=3.0, presence_penalty=1.0, frequency_penalty=0.5)
    padded = jnp.full((2, 5), -1, jnp.int32)
    np.testing.assert_array_equal(process_jit(logits, config, padded), np.asarray(logits))
    # only the real ids of a partly padded row are penalised
    partly = jnp.array([[-1, 3, -1, -1, -1], [-1, -1, -1, -1, -1]], jnp.int32)
    out = np.asarray(process_jit(logits, config, partly))
    np.testing.assert_allclose(out[0], [2.0, -1.0, 0.5, 3.0 / 3.0 - 1.0 - 0.5], rtol=1e-6)
    np.testing.assert_array_equal(out[1], np.asarray(logits[1]))


def test_one_dimensional_history_with_one_dimensional_logits():
    logits = jnp.asarray(np.array([2.0, -1.0, 0.5, 3.0], np.float32))
    config = SamplingConfig(repetition_penalty=2.0)
    out = np.asarray(process_jit(logits, config, jnp.array([1, 3, -1])))
    np.testing.assert_allclose(out, [2.0, -2.0, 0.5, 1.5], rtol=1e-6)
    with pytest.raises(ValueError, match="token_history"):
        process_logits(logits, config, jnp.array([[1, 3]]))  # [B, H] history needs [B, V] logits


def test_history_shape_errors():
    logits = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="rows"):
        process_logits(logits, SamplingConfig(), jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        process_logits(logits, SamplingConfig(), jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="token_history"):
        process_logits(logits, SamplingConfig(), jnp.zeros((2, 4, 1), jnp.int32))


def test_empty_history_is_no_history():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9)).astype(np.float32))
    config = SamplingConfig(repetition_penalty=1.7, presence_penalty=0.3)
    np.testing.assert_array_equal(
        process_jit(logits, config, jnp.zeros((2, 0), jnp.int32)), process_jit(logits, config)
    )


# ---- the default order, by hand -------------------------------------------------------------
def test_default_order_by_hand():
    logits = jnp.array([[2.0, -1.0, 0.5, 0.0, 1.0]], jnp.float32)
    config = SamplingConfig(
        logit_bias={2: -1.0, 4: 5.0},
        banned_token_ids=[4],
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        temperature=0.5,
    )
    history = jnp.array([[2, 1, 1, -1]], jnp.int32)
    # bias: z2 = -0.5, z4 = 6 -> banned: z4 = -inf -> repetition (set {1, 2}, negative -> *2):
    # z1 = -2, z2 = -1 -> presence/frequency: z1 = -2 - .5 - .5 = -3, z2 = -1 - .5 - .25 = -1.75
    # -> temperature 0.5: [4, -6, -3.5, 0, -inf]
    out = np.asarray(process_jit(logits, config, history))
    np.testing.assert_allclose(out, [[4.0, -6.0, -3.5, 0.0, -np.inf]], rtol=1e-6)
    ref = reference_process(
        np.asarray(logits),
        token_history=np.asarray(history),
        temperature=0.5,
        logit_bias={2: -1.0, 4: 5.0},
        banned_token_ids=[4],
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    np.testing.assert_allclose(out, ref.logits, rtol=1e-6)


def test_min_new_tokens_masks_eos_per_row():
    logits = jnp.zeros((3, 6), jnp.float32)
    config = SamplingConfig(min_new_tokens=[2, 2, 0], eos_token_id=[3, 3, 3])
    generated = jnp.array([[5, -1, -1], [5, 1, -1], [-1, -1, -1]], jnp.int32)
    # one compiled program for the state (not one eager op at a time) and one for processing
    state = jax.jit(state_after_generating, static_argnums=(0, 2))(DEFAULT_PROCESSORS, generated, 6, config)
    out = np.asarray(jax.jit(lambda x, c, s: process_logits(x, c, state=s))(logits, config, state))
    assert out[0, 3] == -np.inf  # one token generated < 2: EOS masked
    assert np.isfinite(out[1]).all()  # two generated: EOS allowed
    assert np.isfinite(out[2]).all()  # min_new_tokens 0
    ref = reference_process(
        np.asarray(logits),
        token_history=np.asarray(generated),
        num_generated=np.sum(np.asarray(generated) >= 0, axis=1),
        min_new_tokens=[2, 2, 0],
        eos_token_id=[3, 3, 3],
    )
    np.testing.assert_array_equal(np.isfinite(out), ref.kept())
    # standalone, a history is context: nothing was generated yet
    out = np.asarray(process_jit(logits, SamplingConfig(min_new_tokens=1, eos_token_id=2), generated))
    assert (out[:, 2] == -np.inf).all() and np.isfinite(np.delete(out, 2, axis=1)).all()


def test_per_row_logit_bias_and_banned_tokens():
    rng = np.random.default_rng(3)
    logits = random_logits(rng, (3, 40), 1.0)
    bias = [{0: 2.0, 5: -1.5}, {}, {39: 10.0}]
    banned = [[1, 2], [], [39, 0, 7]]
    config = SamplingConfig(logit_bias=bias, banned_token_ids=banned)
    out = process_jit(jnp.asarray(logits), config)
    ref = reference_process(logits, logit_bias=bias, banned_token_ids=banned)
    assert compare_rows(out, ref) == 3


# ---- each processor alone --------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [300])
def test_each_processor_alone_matches_reference(vocab):
    rng = np.random.default_rng(vocab)
    batch = 4
    logits = random_logits(rng, (batch, vocab), 2.0)
    history = random_history(rng, batch, vocab)
    generated = np.sum(history >= 0, axis=1)
    x = jnp.asarray(logits)
    cases = [
        (apply_logit_bias, dict(logit_bias={0: 1.5, vocab - 1: -2.0})),
        (mask_banned_tokens, dict(banned_token_ids=[1, vocab - 2])),
        (mask_eos_before_min_new_tokens, dict(min_new_tokens=[0, 5, 20, 1], eos_token_id=[2, 2, 2, 2])),
        (apply_repetition_penalty, dict(repetition_penalty=[1.0, 1.3, 0.8, 2.5])),
        (
            apply_presence_frequency_penalties,
            dict(presence_penalty=[0.0, 0.5, -0.5, 1.0], frequency_penalty=[0.2, 0.0, 0.3, -0.1]),
        ),
        (apply_temperature, dict(temperature=[0.5, 1.0, 2.0, 0.7])),
        (filter_top_k, dict(top_k=[1, 3, 0, vocab])),
        (filter_top_p, dict(top_p=[0.1, 0.5, 0.9, 1.0])),
        (filter_min_p, dict(min_p=[0.0, 0.05, 0.3, 1.0])),
        (filter_typical_p, dict(typical_p=[0.2, 0.5, 0.9, 1.0])),
    ]
    configs = [SamplingConfig(**params) for _, params in cases]
    processors = tuple(as_processor(processor) for processor, _ in cases)

    # One compiled program runs every case (one compile instead of one per processor).
    @jax.jit
    def run_all(x, history, generated, configs):
        outs = []
        for (processor, _), member, config in zip(cases, processors, configs, strict=True):
            if processor is mask_eos_before_min_new_tokens:  # state: tokens generated per row
                state = generated
            else:
                state = init_from_history(member, history, vocab, config)
            outs.append(member.process(x, config, state))
        return outs

    outs = run_all(x, jnp.asarray(history), jnp.asarray(generated, jnp.int32), configs)
    for (processor, params), out in zip(cases, outs, strict=True):
        ref = reference_process(logits, token_history=history, num_generated=generated, **params)
        assert compare_rows(out, ref) >= 3, (processor, params)


def test_temperature_leaves_greedy_rows_alone():
    x = jnp.asarray(random_logits(np.random.default_rng(0), (3, 10)))
    config = SamplingConfig(temperature=[0.0, 0.5, 2.0], do_sample=[True, False, True])
    np.testing.assert_array_equal(is_greedy(config, 3), [True, True, False])
    out = np.asarray(apply_temperature(x, config))
    np.testing.assert_array_equal(out[:2], np.asarray(x[:2]))
    np.testing.assert_allclose(out[2], np.asarray(x[2]) / 2.0, rtol=1e-7)


def test_truncation_keeps_only_first_argmax_for_greedy_rows():
    x = jnp.array([[1.0, 3.0, 3.0, -2.0], [3.0, 1.0, 3.0, 0.0]], jnp.float32)
    config = SamplingConfig(temperature=0.0, top_k=3)
    out = np.asarray(jax.jit(apply_truncation)(x, config))
    np.testing.assert_array_equal(out, [[-np.inf, 3.0, -np.inf, -np.inf], [3.0, -np.inf, -np.inf, -np.inf]])


def test_chain_composes_left_to_right():
    x = jnp.asarray(random_logits(np.random.default_rng(5), (2, 30)))
    history = jnp.asarray(random_history(np.random.default_rng(6), 2, 30))
    config = SamplingConfig(repetition_penalty=1.4, presence_penalty=0.2, temperature=0.8, top_k=7, top_p=0.8)
    steps = (
        apply_repetition_penalty,
        apply_presence_frequency_penalties,
        apply_temperature,
        apply_truncation,
    )

    @jax.jit
    def both_ways(x, config, history):
        by_hand = x
        for processor in steps:
            processor = as_processor(processor)
            by_hand = processor.process(by_hand, config, init_from_history(processor, history, 30, config))
        chained = chain(*steps)
        return (
            chained.process(x, config, init_from_history(chained, history, 30, config)),
            by_hand,
            process_logits(x, config, history, processors=DEFAULT_PROCESSORS),
            process_logits(x, config, history),
            process_logits(x, config, history, processors=chain(apply_temperature)),
        )

    chained, by_hand, default, processed, only_temperature = both_ways(x, config, history)
    np.testing.assert_array_equal(np.asarray(chained), np.asarray(by_hand))
    np.testing.assert_array_equal(np.asarray(default), np.asarray(processed))
    # a custom chain is accepted by process_logits
    np.testing.assert_allclose(np.asarray(only_temperature), np.asarray(x) / 0.8, rtol=1e-6)


def test_chains_of_equal_members_are_equal():
    """A processor is a static argument: equal chains share one compiled program."""
    assert chain(apply_temperature, apply_penalties) == chain(apply_temperature, apply_penalties)
    assert hash(chain(apply_temperature)) == hash(chain(apply_temperature))
    assert chain(apply_temperature) != chain(apply_truncation)


# ---- the whole chain on many random configs -------------------------------------------------
@pytest.mark.parametrize("vocab", VOCABS)
def test_process_logits_matches_reference_per_row_configs(vocab):
    rng = np.random.default_rng(1000 + vocab)
    batch, trials = 4, 6
    compared = 0
    for _ in range(trials):
        logits = random_logits(rng, (batch, vocab))
        history = random_history(rng, batch, vocab)
        params = random_row_params(rng, vocab, batch)
        out = process_jit(jnp.asarray(logits), SamplingConfig(**params), jnp.asarray(history))
        compared += compare_rows(out, reference_process(logits, token_history=history, **params))
    assert compared >= 0.8 * batch * trials


@pytest.mark.parametrize("vocab", [50, 300, 5000])
def test_process_logits_matches_reference_unbatched(vocab):
    rng = np.random.default_rng(2000 + vocab)
    compared, trials = 0, 6
    for _ in range(trials):
        logits = random_logits(rng, (vocab,))
        params = random_row_params(rng, vocab, None)
        out = process_jit(jnp.asarray(logits), SamplingConfig(**params))
        assert out.shape == (vocab,) and out.dtype == jnp.float32
        compared += compare_rows(out, reference_process(logits, **params))
    assert compared >= 0.8 * trials


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.sampled_from([7, 50, 1000]),
    temperature=st.sampled_from([0.0, 0.25, 0.7, 1.0, 1.8]),
    top_k=st.integers(0, 60),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.5)),
    typical_p=st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    repetition_penalty=st.floats(0.5, 3.0),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
)
def test_process_logits_hypothesis(
    seed, vocab, temperature, top_k, top_p, min_p, typical_p, repetition_penalty, scale
):
    rng = np.random.default_rng(seed)
    batch = 4  # the shapes and tree structure of the per-row tests: their compiled programs
    logits = random_logits(rng, (batch, vocab), scale)
    history = random_history(rng, batch, vocab)
    # the same value in every row, given as [B] arrays to share one compiled function
    params = {
        name: np.full(batch, value, dtype)
        for name, value, dtype in [
            ("temperature", temperature, np.float32),
            ("top_k", top_k, np.int32),
            ("top_p", top_p, np.float32),
            ("min_p", min_p, np.float32),
            ("typical_p", typical_p, np.float32),
            ("repetition_penalty", repetition_penalty, np.float32),
            ("presence_penalty", 0.0, np.float32),
            ("frequency_penalty", 0.0, np.float32),
            ("do_sample", True, bool),
        ]
    }
    out = process_jit(jnp.asarray(logits), SamplingConfig(**params), jnp.asarray(history))
    compare_rows(out, reference_process(logits, token_history=history, **params))


def test_bfloat16_logits_are_processed_in_float32():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(random_logits(rng, (2, 300), 2.0), jnp.bfloat16)
    params = dict(temperature=0.7, top_k=40, top_p=0.9)
    out = process_jit(logits, SamplingConfig(**params))
    assert out.dtype == jnp.float32
    ref = reference_process(np.asarray(logits.astype(jnp.float32)), **params)
    # bfloat16 logits have many exact ties; the tie rule makes the kept set well defined
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), ref.kept())
