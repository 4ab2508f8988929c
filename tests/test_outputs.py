"""What generation returns and when it stops: logprobs (processed and raw), top logprobs,
`score`, stop ids and stop sequences, `num_samples`, and Hugging Face's min_tokens_to_keep
and multi-EOS min_new_tokens cases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.decoding import generate, score, self_speculative_generate, speculative_generate
from rtdlm.decoding.testing import MarkovModel, random_markov_model
from rtdlm.sampling import (
    SamplingConfig,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    filter_typical_p,
    mask_eos_before_min_new_tokens,
    process_logits,
)
from tests.markov_reference import chisquare_pvalue, markov_joint, process_distribution

VOCAB = 8
TARGET = random_markov_model(VOCAB, seed=3, num_layers=3)
DRAFT = MarkovModel(TARGET.table + random_markov_model(VOCAB, seed=4, scale=1.0).table)
SAMPLING = SamplingConfig(temperature=0.8, top_k=5)


def _decoders():
    """(name, decode(prompt, config, **kwargs)) for the three decoders on the Markov fake."""
    return {
        "generate": lambda prompt, config, **kw: generate(TARGET, prompt, config=config, **kw),
        "speculative": lambda prompt, config, **kw: speculative_generate(
            TARGET, DRAFT, prompt, config=config, num_speculative_tokens=3, **kw
        ),
        "self_speculative": lambda prompt, config, **kw: self_speculative_generate(
            TARGET, prompt, config=config, early_exit_layer=1, num_speculative_tokens=3, **kw
        ),
    }


DECODERS = _decoders()


def _reference_logprobs(prompt_row, tokens, mode, config=SAMPLING):
    """Exact float64 logprobs of one row's new tokens under the Markov fake."""
    table = np.asarray(TARGET.table, np.float64)
    out, previous = [], int(prompt_row[-1])
    for token in tokens:
        logits = table[previous]
        if mode == "raw":
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
        else:
            probs = process_distribution(
                logits, temperature=float(config.temperature), top_k=int(config.top_k)
            )[0]
        out.append(np.log(probs[token]))
        previous = int(token)
    return np.array(out)


# ---- logprobs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", list(DECODERS))
@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_logprobs_are_the_exact_logprobs_of_the_emitted_tokens(decoder, mode):
    prompt = jnp.array([[1, 2], [3, 4], [5, 6], [7, 0]], jnp.int32)
    out = DECODERS[decoder](prompt, SAMPLING, key=jax.random.key(1), max_new_tokens=9, logprobs_mode=mode)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    assert logprobs.shape == tokens.shape and logprobs.dtype == np.float32
    for b in range(prompt.shape[0]):
        expected = _reference_logprobs(np.asarray(prompt[b]), tokens[b], mode)
        np.testing.assert_allclose(logprobs[b], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", ["speculative", "self_speculative"])
def test_speculative_logprobs_equal_generates_on_the_same_greedy_tokens(decoder):
    prompt = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
    greedy = SamplingConfig(temperature=0.0)
    kwargs = dict(key=jax.random.key(0), max_new_tokens=12, prompt_lengths=jnp.array([3, 2]))
    for mode in ("processed", "raw"):
        plain = generate(TARGET, prompt, config=greedy, logprobs_mode=mode, num_top_logprobs=3, **kwargs)
        spec = DECODERS[decoder](prompt, greedy, logprobs_mode=mode, num_top_logprobs=3, **kwargs)
        np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
        np.testing.assert_allclose(np.asarray(spec.logprobs), np.asarray(plain.logprobs), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(spec.top_token_ids), np.asarray(plain.top_token_ids))
        np.testing.assert_allclose(np.asarray(spec.top_logprobs), np.asarray(plain.top_logprobs), atol=1e-6)


def test_greedy_processed_logprobs_are_zero_and_top_logprobs_descend():
    prompt = jnp.array([[1], [2]], jnp.int32)
    greedy = generate(
        TARGET, prompt, key=jax.random.key(0), config=SamplingConfig(temperature=0.0),
        max_new_tokens=5, num_top_logprobs=2,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(greedy.logprobs), 0.0)
    np.testing.assert_array_equal(np.asarray(greedy.top_token_ids[..., 0]), np.asarray(greedy.tokens))
    assert np.all(np.isneginf(np.asarray(greedy.top_logprobs[..., 1])))  # a point mass: no second
    raw = generate(
        TARGET, prompt, key=jax.random.key(0), config=SAMPLING, max_new_tokens=6,
        logprobs_mode="raw", num_top_logprobs=VOCAB,
    )  # fmt: skip
    top = np.asarray(raw.top_logprobs)
    assert np.all(np.diff(top, axis=-1) <= 0)
    np.testing.assert_allclose(np.exp(top).sum(-1), 1.0, rtol=1e-5)  # the whole distribution
    rank = np.argmax(np.asarray(raw.top_token_ids) == np.asarray(raw.tokens)[..., None], axis=-1)
    picked = np.take_along_axis(top, rank[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(picked, np.asarray(raw.logprobs), atol=1e-6)


def test_logprobs_are_zero_after_a_rows_end():
    out = generate(
        TARGET, jnp.array([[1], [2], [3]]), key=jax.random.key(2), config=SAMPLING, max_new_tokens=12,
        eos_token_id=0,
    )  # fmt: skip
    tokens, lengths, logprobs = map(np.asarray, (out.tokens, out.lengths, out.logprobs))
    for b in range(3):
        assert np.all(logprobs[b, lengths[b] :] == 0.0)
        assert np.all(logprobs[b, : lengths[b]] <= 0.0)
    assert np.any(logprobs < 0.0)


# ---- score ------------------------------------------------------------------------------------
def test_score_on_the_markov_fake_is_the_table_log_softmax():
    tokens = jnp.array([[1, 4, 2, 7, 3], [5, 5, 0, 0, 0]], jnp.int32)
    out = np.asarray(score(TARGET, tokens, prompt_lengths=jnp.array([5, 2])))
    table = np.asarray(TARGET.table, np.float64)
    log_softmax = table - table.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = np.zeros((2, 5))
    for b, length in enumerate([5, 2]):
        for t in range(1, length):
            expected[b, t] = log_softmax[tokens[b, t - 1], tokens[b, t]]
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.slow
def test_score_on_the_bundled_model_equals_generates_raw_logprobs():
    from rtdlm.models import encode, load_model

    model = load_model("target")
    prompt = jnp.asarray([encode("def fib(n):\n    ")])
    out = generate(
        model, prompt, key=jax.random.key(3), config=SamplingConfig(temperature=0.9), max_new_tokens=16,
        logprobs_mode="raw",
    )  # fmt: skip
    text = jnp.concatenate([prompt, out.tokens], axis=1)
    scored = np.asarray(score(model, text))
    np.testing.assert_allclose(scored[0, prompt.shape[1] :], np.asarray(out.logprobs[0]), atol=2e-4)
    # by hand: the full forward's log-softmax gathered at each next token
    positions = jnp.arange(text.shape[1])[None]
    logits, _ = model(text, positions, model.init_cache(1, text.shape[1]))
    log_probs = np.asarray(jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32)))
    expected = log_probs[np.arange(text.shape[1] - 1), np.asarray(text[0, 1:])]
    np.testing.assert_allclose(scored[0, 1:], expected, atol=1e-5)
    assert scored[0, 0] == 0.0


# ---- stops ------------------------------------------------------------------------------------
def _cycle_model(vocab=16):
    """Greedy chain i -> i + 1 (mod V), for target and draft alike: every draft is accepted."""
    table = np.full((vocab, vocab), -5.0, np.float32)
    table[np.arange(vocab), (np.arange(vocab) + 1) % vocab] = 5.0
    return MarkovModel(jnp.asarray(table), jnp.asarray(table)[None], num_layers=2)


CYCLE = _cycle_model()
GREEDY = SamplingConfig(temperature=0.0)


def _run(decoder, prompt, **kwargs):
    kwargs = dict(key=jax.random.key(0), config=GREEDY, max_new_tokens=12, pad_token_id=15) | kwargs
    if decoder == "generate":
        return generate(CYCLE, prompt, **kwargs)
    if decoder == "speculative":
        return speculative_generate(CYCLE, CYCLE, prompt, num_speculative_tokens=4, **kwargs)
    return self_speculative_generate(CYCLE, prompt, early_exit_layer=1, num_speculative_tokens=4, **kwargs)


@pytest.mark.parametrize("decoder", list(DECODERS))
@pytest.mark.parametrize(
    "stop, length",
    [
        ([3, 4], 4),  # inside the first speculative round (first token 1, round 1 emits 2..6)
        ([1, 2], 2),  # straddles the first token and round 1
        ([6, 7], 7),  # straddles rounds 1 and 2
        ([9], 9),
    ],
)
def test_stop_sequence_ends_the_row_with_the_stop_included(decoder, stop, length):
    out = _run(decoder, jnp.array([[0]]), stop_sequences=[[13, 14, 15], stop])
    expected = [*range(1, length + 1)] + [15] * (12 - length)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), expected)
    assert int(out.lengths[0]) == length
    assert np.all(np.asarray(out.logprobs[0, length:]) == 0.0)


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_per_row_stop_ids_and_sequences(decoder):
    prompt = jnp.array([[0], [0], [4], [0]])
    out = _run(
        decoder,
        prompt,
        stop_token_ids=[[5, -1], [3, 11], [-1, -1], [-1, -1]],
        stop_sequences=[[[7, 8]], [[2, 3]], [[8, 9], [5, 6, 7]], [[20 % 16]]],
        eos_token_id=-1,
    )
    np.testing.assert_array_equal(np.asarray(out.lengths), [5, 3, 3, 4])
    np.testing.assert_array_equal(np.asarray(out.tokens[2, :4]), [5, 6, 7, 15])


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_only_generated_tokens_count_toward_a_stop_sequence(decoder):
    # the prompt ends in 5; the stop [5, 6] must not fire on the first generated token 6
    out = _run(decoder, jnp.array([[4, 5]]), stop_sequences=[[5, 6]], max_new_tokens=16)
    assert int(out.lengths[0]) == 16  # ... but later: 6 7 ... 15 0 1 ... then 5 6 at 15, 16
    out = _run(decoder, jnp.array([[4, 5]]), stop_sequences=[[5, 6]], max_new_tokens=20)
    assert int(out.lengths[0]) == 17


def test_stop_ids_from_the_config_and_min_new_tokens_masks_every_stop():
    config = SamplingConfig(temperature=0.0, stop_token_ids=[2, 9], min_new_tokens=3)
    out = generate(CYCLE, jnp.array([[0]]), key=jax.random.key(0), config=config, max_new_tokens=12)
    # 1, then 2 is masked (too early): the first of the tied -5 logits, 0, wins; then 1, and
    # the stop 2 at the fourth token
    np.testing.assert_array_equal(np.asarray(out.tokens[0, :5]), [1, 0, 1, 2, 0])
    assert int(out.lengths[0]) == 4


def test_min_new_tokens_masks_several_eos_ids_like_hugging_face():
    # transformers' test_new_min_length_dist_processor with eos_token_id=[0, 18]
    config = SamplingConfig(min_new_tokens=3, eos_token_id=0, stop_token_ids=[18])
    scores = jnp.ones((4, 20)) / 20
    for generated, masked in ((0, True), (1, True), (2, True), (3, False), (10, False)):
        out = np.asarray(
            process_logits(
                scores,
                config,
                state=jnp.full(4, generated, jnp.int32),
                processors=mask_eos_before_min_new_tokens,
            )
        )
        if masked:
            assert np.all(np.isneginf(out[:, [0, 18]])) and np.isfinite(np.delete(out, [0, 18], 1)).all()
        else:
            assert np.isfinite(out).all()


def test_from_generation_config_reads_every_eos_id():
    config = SamplingConfig.from_generation_config({"eos_token_id": [128001, 128008, 128009]})
    assert int(config.eos_token_id) == 128001
    np.testing.assert_array_equal(np.asarray(config.stop_ids(1))[0], [128001, 128001, 128008, 128009])


# ---- num_samples ------------------------------------------------------------------------------
def test_num_samples_rows_follow_the_exact_distribution_and_differ():
    prompts = jnp.array([[1], [6]], jnp.int32)
    n = 30_000
    out = generate(TARGET, prompts, key=jax.random.key(7), config=SAMPLING, max_new_tokens=3, num_samples=n)
    tokens = np.asarray(out.tokens).reshape(2, n, 3)
    for b in range(2):
        joint = markov_joint(TARGET.table, np.asarray(prompts[b]), 3, SAMPLING)
        assert chisquare_pvalue(tokens[b], joint) > 1e-4
        assert len({tuple(row) for row in tokens[b]}) > 5  # samples of one prompt differ


def test_num_samples_with_per_row_seeds_still_differ():
    config = SamplingConfig(temperature=5.0, seed=np.array([5, 5]))  # flat: samples differ
    out = generate(TARGET, jnp.array([[1], [1]]), key=jax.random.key(0), config=config, max_new_tokens=6,
                   num_samples=4)  # fmt: skip
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (8, 6)
    np.testing.assert_array_equal(tokens[:4], tokens[4:])  # same seeds: same samples per prompt
    assert len({tuple(row) for row in tokens[:4]}) > 1


@pytest.mark.parametrize("decoder", ["speculative", "self_speculative"])
def test_num_samples_in_the_speculative_decoders(decoder):
    out = DECODERS[decoder](
        jnp.array([[1, 2], [3, 0]]), SAMPLING, key=jax.random.key(1), max_new_tokens=5, num_samples=3,
        prompt_lengths=jnp.array([2, 1]), stop_sequences=[[[0, 0]], [[7]]],
    )  # fmt: skip
    assert out.tokens.shape == (6, 5) and out.num_accepted.shape == (6,)


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logprobs_mode="log"), ValueError, "logprobs_mode"),
        (dict(num_top_logprobs=-1), ValueError, "num_top_logprobs"),
        (dict(num_top_logprobs=1.5), TypeError, "num_top_logprobs"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(stop_sequences=[[1, "a"]]), TypeError, "stop_sequences"),
        (dict(stop_sequences=[[]]), ValueError, "stop_sequences"),
        (dict(stop_sequences=[[-3]]), ValueError, "stop_sequences"),
        (dict(stop_token_ids=[[1], [2], [3]]), ValueError, "per-row values for 3 rows"),
    ],
)
def test_bad_output_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(TARGET, jnp.array([[1], [2]]), key=jax.random.key(0), config=SAMPLING, max_new_tokens=2,
                 **kwargs)  # fmt: skip


# ---- min_tokens_to_keep: transformers' tests/generation/test_logits_process.py ---------------
def _kept(processor, logits, **config):
    out = process_logits(jnp.asarray(logits, jnp.float32), SamplingConfig(**config), processors=processor)
    return np.isfinite(np.asarray(out)).sum(-1).tolist()


def _ramp(batch=2, vocab=10):
    ramp = np.tile(np.arange(vocab, dtype=np.float32) - vocab // 2, (batch, 1))
    ramp[1] *= 100.0
    return ramp


def test_top_k_min_tokens_to_keep():
    uniform = np.full((2, 5), 0.2, np.float32)
    assert _kept(filter_top_k, uniform, top_k=1, min_tokens_to_keep=3) == [5, 5]
    ramp = np.tile(np.arange(5, dtype=np.float32), (2, 1))
    assert _kept(filter_top_k, ramp, top_k=1, min_tokens_to_keep=3) == [3, 3]


def test_top_p_min_tokens_to_keep():
    dist = np.log(np.array([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]], np.float32))
    out = np.exp(
        np.asarray(process_logits(jnp.asarray(dist), SamplingConfig(top_p=0.8), processors=filter_top_p))
    )
    np.testing.assert_allclose(out, [[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]], atol=1e-3)
    assert _kept(filter_top_p, _ramp(), top_p=0.9, min_tokens_to_keep=2) == [3, 2]


def test_min_p_min_tokens_to_keep():
    dist = np.log(np.array([[0.9, 0.0274, 0.047, 0.0274], [0.15, 0.3, 0.3, 0.25], [0.97, 0.01, 0.01, 0.01]]))
    out = np.exp(np.asarray(process_logits(jnp.asarray(dist, jnp.float32), SamplingConfig(min_p=0.05),
                                           processors=filter_min_p)))  # fmt: skip
    np.testing.assert_allclose(out, [[0.9, 0, 0.047, 0], [0.15, 0.3, 0.3, 0.25], [0.97, 0, 0, 0]], atol=1e-3)
    assert _kept(filter_min_p, _ramp(), min_p=0.9, min_tokens_to_keep=2) == [2, 2]


def test_typical_p_min_tokens_to_keep():
    dist = np.log(np.array([[0.97, 0.01, 0.01, 0.01], [0.4, 0.2, 0.2, 0.2]], np.float32))
    out = np.exp(np.asarray(process_logits(jnp.asarray(dist), SamplingConfig(typical_p=0.5),
                                           processors=filter_typical_p)))  # fmt: skip
    np.testing.assert_allclose(out, [[0.97, 0, 0, 0], [0, 0.2, 0.2, 0.2]], atol=1e-3)
    uniform = np.full((2, 5), 0.2, np.float32)
    assert _kept(filter_typical_p, uniform, typical_p=0.5, min_tokens_to_keep=3) == [5, 5]
    assert _kept(filter_typical_p, _ramp(), typical_p=0.7, min_tokens_to_keep=2) == [2, 2]


@pytest.mark.parametrize("num_candidates", [4, 128])
def test_min_tokens_to_keep_on_the_fast_path_and_the_fallback(num_candidates, rng):
    logits = jnp.asarray(rng.normal(size=(64, 300)).astype(np.float32) * 4)
    keep = rng.integers(1, 12, size=64)
    config = SamplingConfig(top_p=0.3, min_tokens_to_keep=keep, num_candidates=num_candidates)
    top_p = jax.jit(functools.partial(process_logits, processors=filter_top_p))
    kept = np.isfinite(np.asarray(top_p(logits, config)))
    plain = np.isfinite(np.asarray(top_p(logits, config.replace(min_tokens_to_keep=1))))
    np.testing.assert_array_equal(kept.sum(-1), np.maximum(plain.sum(-1), keep))
    # the kept set is always the most probable tokens
    order = np.argsort(-np.asarray(logits), axis=-1)
    counts = kept.sum(-1)
    for b in range(64):
        assert kept[b, order[b, : counts[b]]].all()
