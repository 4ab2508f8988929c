"""Tests of `rtdlm.decoding.beam_search`: exhaustive search on a Markov fake, equality with
`transformers`' beam search on a tiny random Llama checkpoint, compile-once, bad arguments."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.decoding import BeamSearchOutput, beam_search, generate
from rtdlm.decoding import beam as beam_module
from rtdlm.decoding.testing import random_markov_model
from rtdlm.sampling import SamplingConfig


# ---------------------------------------------------------------------------------------
# Exhaustive search on a Markov fake: with k = V**N beams nothing is pruned.
def _enumerate(table, prompt, num_tokens, eos, length_penalty, repetition_penalty=1.0):
    """Every hypothesis (ending at its first EOS, else after num_tokens tokens) with its Hugging
    Face score, float64, best first: [(score, tokens tuple)]."""
    table = np.asarray(table, np.float64)
    logprobs = table - np.log(np.exp(table).sum(-1, keepdims=True))  # [V, V]
    hypotheses = {}
    for seq in itertools.product(range(table.shape[0]), repeat=num_tokens):
        if eos in seq:
            seq = seq[: seq.index(eos) + 1]
        history, total = list(prompt), 0.0
        for token in seq:
            step = logprobs[history[-1]].copy()
            seen = sorted(set(history))
            step[seen] = np.where(
                step[seen] < 0, step[seen] * repetition_penalty, step[seen] / repetition_penalty
            )
            total += step[token]
            history.append(token)
        hypotheses[seq] = total / len(seq) ** length_penalty
    return sorted(((score, seq) for seq, score in hypotheses.items()), reverse=True)


def _hypotheses(out: BeamSearchOutput, row: int):
    tokens, lengths = np.asarray(out.tokens[row]), np.asarray(out.lengths[row])
    return [tuple(int(t) for t in tokens[i, : lengths[i]]) for i in range(tokens.shape[0])]


@pytest.mark.parametrize(
    "length_penalty, eos, early_stopping, repetition_penalty",
    [(1.0, -1, False, 1.0), (0.5, 2, False, 1.0), (2.0, 2, "never", 1.0), (1.0, 1, False, 1.5)],
)
def test_exhaustive_beams_are_the_exact_top_hypotheses(
    length_penalty, eos, early_stopping, repetition_penalty
):
    """V = 3, N = 3, k = 27 = V**N: the beams are every hypothesis, sorted by score (exact ties
    may come in either order), each with its own score; with an EOS there are fewer hypotheses
    than beams, and the remaining slots score below -1e8 (Hugging Face's -1e9 placeholders).
    Two prompts in one batch; the cache (batch-first) goes through the default reorder_cache,
    the penalty's state follows the beams."""
    vocab, steps = 3, 3
    model = random_markov_model(vocab, seed=1)
    prompts = np.array([[0], [2]], np.int32)
    config = SamplingConfig(repetition_penalty=repetition_penalty)
    out = beam_search(
        model,
        prompts,
        num_beams=vocab**steps,
        max_new_tokens=steps,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        config=config,
    )
    for row, prompt in enumerate(prompts):
        expected = _enumerate(model.table, prompt, steps, eos, length_penalty, repetition_penalty)
        real = len(expected)
        got = _hypotheses(out, row)[:real]
        scores = np.asarray(out.scores[row])
        np.testing.assert_allclose(scores[:real], [s for s, _ in expected], rtol=1e-5, atol=1e-6)
        reference = {seq: score for score, seq in expected}
        assert sorted(got) == sorted(reference)  # every hypothesis once
        np.testing.assert_allclose(scores[:real], [reference[seq] for seq in got], rtol=1e-5, atol=1e-6)
        assert np.all(scores[real:] < -1e8)
        lengths = np.asarray(out.lengths[row, :real])
        np.testing.assert_array_equal(lengths, [len(seq) for seq in got])
        tokens = np.asarray(out.tokens[row, :real])
        assert np.all(tokens[np.arange(steps)[None] >= lengths[:, None]] == 0)  # pad_token_id


def test_one_beam_is_greedy():
    model = random_markov_model(16, seed=3)
    prompts = jnp.array([[1, 4, 2], [5, 5, 0]], jnp.int32)
    config = SamplingConfig(do_sample=False, repetition_penalty=1.2)
    greedy = generate(model, prompts, key=jax.random.key(0), config=config, max_new_tokens=7)
    beams = beam_search(model, prompts, num_beams=1, max_new_tokens=7, config=config)
    np.testing.assert_array_equal(beams.tokens[:, 0], greedy.tokens)
    assert beams.tokens.shape == (2, 1, 7) and beams.scores.shape == (2, 1)


def test_compiles_once_across_configs():
    """num_beams and the shapes are the only statics: length penalties, early stopping, EOS
    ids, config values and new weights reuse one program."""
    model = random_markov_model(8, seed=0)
    prompts = jnp.array([[1, 2], [3, 4]], jnp.int32)
    runs = [
        dict(length_penalty=1.0, early_stopping=False, eos_token_id=3),
        dict(length_penalty=0.5, early_stopping=True, eos_token_id=5),
        dict(length_penalty=2.0, early_stopping="never", eos_token_id=None),
        dict(length_penalty=-1.0, early_stopping=False, config=SamplingConfig(repetition_penalty=1.4)),
        dict(config=SamplingConfig(repetition_penalty=2.0, min_new_tokens=2), eos_token_id=3),
    ]
    outputs = []
    for i, extra in enumerate(runs):
        out = beam_search(model, prompts, num_beams=3, max_new_tokens=5, **extra)
        outputs.append(np.asarray(out.scores))
        if i == 0:
            size = beam_module._beam_search._cache_size()
    beam_search(random_markov_model(8, seed=5), prompts, num_beams=3, max_new_tokens=5)
    assert beam_module._beam_search._cache_size() == size
    assert len({o.tobytes() for o in outputs}) == len(runs)  # the values did reach the program


def test_per_row_config_equals_rows_alone():
    model = random_markov_model(8, seed=2)
    prompts = jnp.array([[1, 2], [3, 4]], jnp.int32)
    config = SamplingConfig(repetition_penalty=np.array([1.0, 2.0]), min_new_tokens=np.array([0, 3]))
    both = beam_search(model, prompts, num_beams=3, max_new_tokens=5, eos_token_id=3, config=config)
    for row, (penalty, min_new) in enumerate([(1.0, 0), (2.0, 3)]):
        alone = beam_search(
            model,
            prompts[row : row + 1],
            num_beams=3,
            max_new_tokens=5,
            eos_token_id=3,
            config=SamplingConfig(repetition_penalty=penalty, min_new_tokens=min_new),
        )
        np.testing.assert_array_equal(both.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(both.scores[row], alone.scores[0], rtol=1e-6)


def test_is_one_while_loop():
    model = random_markov_model(8, seed=0)
    jaxpr = str(
        jax.make_jaxpr(lambda p: beam_search(model, p, num_beams=2, max_new_tokens=4).tokens)(
            jnp.ones((1, 2), jnp.int32)
        )
    )
    assert jaxpr.count("while[") == 1


@pytest.mark.parametrize(
    "num_beams, error",
    [
        (0, ValueError),
        (-2, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        ("4", TypeError),
        (None, TypeError),
        (np.bool_(True), TypeError),
    ],
)
def test_bad_num_beams_raise(num_beams, error):
    model = random_markov_model(8, seed=0)
    with pytest.raises(error, match="num_beams"):
        beam_search(model, jnp.ones((1, 2), jnp.int32), num_beams=num_beams, max_new_tokens=4)


@pytest.mark.parametrize(
    "extra, error, name",
    [
        (dict(length_penalty="1"), TypeError, "length_penalty"),
        (dict(length_penalty=float("nan")), ValueError, "length_penalty"),
        (dict(early_stopping="always"), ValueError, "early_stopping"),
        (dict(early_stopping=1), ValueError, "early_stopping"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(config=SamplingConfig(repetition_penalty=np.ones(3))), ValueError, "rows"),
    ],
)
def test_bad_arguments_raise(extra, error, name):
    model = random_markov_model(8, seed=0)
    args = {"num_beams": 2, "max_new_tokens": 4, **extra}
    with pytest.raises(error, match=name):
        beam_search(model, jnp.ones((1, 2), jnp.int32), **args)


def test_cache_without_a_batch_first_layout_raises():
    from rtdlm.decoding import reorder_cache

    with pytest.raises(ValueError, match="reorder_cache"):
        reorder_cache(object(), (jnp.zeros((2, 3)), jnp.zeros((4, 3))), jnp.array([0, 0]))


# ---------------------------------------------------------------------------------------
# Equality with transformers' beam search on a tiny random Llama checkpoint.
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, rtdlm model from its save_pretrained directory)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_pretrained import _hf_model

    from rtdlm.models import from_pretrained

    hf = _hf_model("llama")
    directory = tmp_path_factory.mktemp("llama-beam")
    hf.save_pretrained(directory)
    return hf, from_pretrained(directory)


N = 10


def _hf_beams(hf, prompt, num_beams, eos, **kwargs):
    """transformers' k hypotheses for one prompt [P]: ([k] token arrays cut after the EOS, [k] scores)."""
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor(prompt[None], dtype=torch.long),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=N,
            eos_token_id=eos,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    tokens = []
    for row in out.sequences[:, len(prompt) :].numpy():
        ends = np.flatnonzero(row == eos)
        tokens.append(row[: ends[0] + 1] if len(ends) else row)
    return tokens, out.sequences_scores.numpy()


def _check_equal(hf, model, prompts, lengths, num_beams, eos, config=None, hf_kwargs=None, **kwargs):
    """beam_search on the batch against transformers prompt by prompt: same hypotheses in the
    same order, scores within 1e-4. Returns (max score difference, beam lengths [B, k])."""
    out = beam_search(
        model,
        prompts,
        prompt_lengths=lengths,
        num_beams=num_beams,
        max_new_tokens=N,
        eos_token_id=eos,
        config=config,
        **kwargs,
    )
    worst = 0.0
    for row, n in enumerate(lengths):
        expected, scores = _hf_beams(hf, prompts[row, :n], num_beams, eos, **kwargs, **(hf_kwargs or {}))
        got = _hypotheses(out, row)
        for i in range(num_beams):
            np.testing.assert_array_equal(got[i], expected[i], err_msg=f"row {row} beam {i} {kwargs}")
        np.testing.assert_allclose(out.scores[row], scores, atol=1e-4, err_msg=str(kwargs))
        worst = max(worst, float(np.abs(np.asarray(out.scores[row]) - scores).max()))
    return worst, np.asarray(out.lengths)


def _prompts_and_eos(model):
    """Two right-padded prompts, and an EOS that greedy decoding of row 0 emits at its third
    step: some beams end early."""
    from test_pretrained import _prompts

    prompts, lengths = _prompts(2, 6, seed=3), np.array([6, 4], np.int32)
    greedy = generate(
        model,
        prompts,
        prompt_lengths=lengths,
        key=jax.random.key(0),
        config=SamplingConfig(do_sample=False),
        max_new_tokens=N,
    )
    return prompts, lengths, int(greedy.tokens[0, 2])


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [2, 4])
def test_equals_transformers(llama, num_beams):
    """k in {2, 4} x length_penalty in {0.5, 1, 2} x early_stopping in {False, True}, an EOS
    some beams reach early, a ragged batch: one compiled program per k."""
    hf, model = llama
    prompts, lengths, eos = _prompts_and_eos(model)
    results = {}
    for length_penalty, early_stopping in itertools.product((0.5, 1.0, 2.0), (False, True)):
        results[length_penalty, early_stopping] = _check_equal(
            hf,
            model,
            prompts,
            lengths,
            num_beams,
            eos,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
    worst = max(diff for diff, _ in results.values())
    print(f"k={num_beams}: 6 configs equal to transformers, max score difference {worst:.2e}")
    assert any(np.any(beam_lengths < N) for _, beam_lengths in results.values())  # EOS reached early
    assert any(not np.array_equal(results[lp, False][1], results[lp, True][1]) for lp in (0.5, 1.0, 2.0))


def test_equals_transformers_with_processors(llama):
    """Per-beam processors as transformers applies them to log-probabilities: repetition
    penalty, no-repeat-ngram, bad words and min_new_tokens."""
    hf, model = llama
    prompts, lengths, eos = _prompts_and_eos(model)
    bad = [[int(prompts[0, 1])], [int(prompts[1, 0]), int(prompts[1, 1])]]
    config = SamplingConfig(
        repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=tuple(map(tuple, bad)), min_new_tokens=3
    )
    hf_kwargs = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=bad, min_new_tokens=3)
    _check_equal(hf, model, prompts, lengths, 3, eos, config=config, hf_kwargs=hf_kwargs, length_penalty=1.0)


@pytest.mark.slow
def test_benchmark_quick_run(repo_root, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "beam.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/beam_search.py", "--quick", "--out", str(out)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["result"]["beam_vs_generate"]["ratio"] > 0
