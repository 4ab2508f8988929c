"""The open decode loop: stateful logits processors in every decoder.

A test-defined processor with state of its own ("ban the previous token") chained with the
defaults must give the exact distribution of a Markov fake under that rule in `generate`,
`speculative_generate` and `self_speculative_generate` alike (speculative decoding stays
lossless), and greedy rows must be identical across the three. The n-gram processors are
checked against Hugging Face's and inside the loops.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov_reference import chisquare_pvalue, process_distribution

from rtdlm.decoding import (
    emit_accepted,
    generate,
    self_speculative_generate,
    speculative_generate,
)
from rtdlm.decoding.testing import MarkovModel, random_markov_model
from rtdlm.sampling import (
    DEFAULT_PROCESSORS,
    LogitsProcessor,
    SamplingConfig,
    bad_words,
    chain,
    init_from_history,
    no_repeat_ngram,
    process_logits,
    sample,
)

VOCAB = 8
PROMPT = np.array([3, 1, 5], np.int32)
ROWS = 60_000
P_MIN = 1e-4
CONFIG = SamplingConfig(temperature=0.8, top_k=5, repetition_penalty=1.3)
TRACES = {"process": 0}


# ---- a stateful processor defined here: ban the previous token (state: last token [B]) ----
def _init_last(prompt, prompt_lengths, vocab_size, config):
    return jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0].astype(jnp.int32)


def _ban_last(logits, config, last):
    TRACES["process"] += 1  # runs at trace time only: counts compilations
    return jnp.where(jnp.arange(logits.shape[-1])[None] == last[:, None], -jnp.inf, logits)


def _write_last(last, tokens, active, config):
    return jnp.where(active, tokens, last)


BAN_PREVIOUS = LogitsProcessor(_init_last, _ban_last, _write_last)
PROCESSORS = chain(BAN_PREVIOUS, DEFAULT_PROCESSORS)


def joint_under_ban(table, prompt, config):
    """Exact [V, V, V] joint of the first three tokens: the previous token banned, then the
    default chain (repetition penalty over prompt + generated, temperature, top-k)."""
    table = np.asarray(table, np.float64)
    params = dict(
        temperature=float(config.temperature),
        top_k=int(config.top_k),
        repetition_penalty=float(config.repetition_penalty),
    )
    joint = np.zeros((VOCAB,) * 3)

    def step(history):
        logits = table[history[-1]].copy()
        logits[history[-1]] = -np.inf
        seen = np.zeros((1, VOCAB), bool)
        seen[0, history] = True
        return process_distribution(logits[None], seen, **params)[0]

    history = list(prompt)
    p1 = step(history)
    for a in range(VOCAB):
        if p1[a] == 0:
            continue
        p2 = step([*history, a])
        for b in range(VOCAB):
            if p2[b] == 0:
                continue
            joint[a, b] = p1[a] * p2[b] * step([*history, a, b])
    return joint


@pytest.fixture(scope="module")
def target():
    return random_markov_model(VOCAB, seed=0, num_layers=3)


@pytest.fixture(scope="module")
def draft(target):
    return MarkovModel(target.table + random_markov_model(VOCAB, seed=1, scale=1.2).table)


@pytest.fixture(scope="module")
def joint(target):
    return joint_under_ban(target.table, PROMPT, CONFIG)


def big_prompt():
    return jnp.asarray(np.tile(PROMPT, (ROWS, 1)))


DECODERS = {
    "generate": lambda target, draft, **kw: generate(target, **kw),
    "speculative": lambda target, draft, **kw: speculative_generate(
        target, draft, num_speculative_tokens=2, **kw
    ),
    "self_speculative": lambda target, draft, **kw: self_speculative_generate(
        target, early_exit_layer=1, num_speculative_tokens=2, **kw
    ),
}


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_stateful_processor_gives_the_exact_distribution(target, draft, joint, decoder):
    out = DECODERS[decoder](
        target,
        draft,
        prompt_tokens=big_prompt(),
        key=jax.random.key(7),
        config=CONFIG,
        max_new_tokens=3,
        processors=PROCESSORS,
    )
    tokens = np.asarray(out.tokens)
    assert (tokens[:, 0] != PROMPT[-1]).all() and (tokens[:, 1:] != tokens[:, :-1]).all()
    pvalue = chisquare_pvalue(tokens, joint)
    print(f"{decoder}: chi-square p = {pvalue:.4g}")
    assert pvalue > P_MIN, pvalue


def test_the_reference_differs_without_the_ban(target, joint):
    """The test has power: the default chain alone is far from the banned joint."""
    out = generate(target, big_prompt(), key=jax.random.key(8), config=CONFIG, max_new_tokens=3)
    with pytest.raises(AssertionError, match="probability-zero"):
        chisquare_pvalue(np.asarray(out.tokens), joint)


def ragged_prompts():
    prompt = np.array([[3, 1, 5, 2], [7, 7, 0, 0], [1, 0, 0, 0], [6, 2, 4, 0]], np.int32)
    return jnp.asarray(prompt), jnp.array([4, 2, 1, 3], jnp.int32)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.0, repetition_penalty=1.3),
        SamplingConfig(temperature=0.0, no_repeat_ngram_size=2),
    ],
)
@pytest.mark.parametrize("processors", [PROCESSORS, DEFAULT_PROCESSORS])
def test_greedy_rows_are_identical_across_decoders(target, draft, config, processors):
    prompt, lengths = ragged_prompts()
    outs = {
        name: np.asarray(
            decode(
                target,
                draft,
                prompt_tokens=prompt,
                prompt_lengths=lengths,
                key=jax.random.key(0),
                config=config,
                max_new_tokens=24,
                processors=processors,
            ).tokens
        )
        for name, decode in DECODERS.items()
    }
    np.testing.assert_array_equal(outs["speculative"], outs["generate"])
    np.testing.assert_array_equal(outs["self_speculative"], outs["generate"])


def test_no_repeat_ngram_holds_in_every_decoder():
    """A sampled token never completes a bigram already in prompt + output, in all three loops."""
    model = random_markov_model(16, seed=3, num_layers=2)
    draft = random_markov_model(16, seed=4)
    config = SamplingConfig(temperature=1.0, no_repeat_ngram_size=2)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(64, 5)), jnp.int32)
    for name, decode in DECODERS.items():
        out = decode(
            model, draft, prompt_tokens=prompt, key=jax.random.key(1), config=config, max_new_tokens=20
        )
        rows = np.concatenate([np.asarray(prompt), np.asarray(out.tokens)], axis=1)
        for row in rows.tolist():
            for j in range(prompt.shape[1], len(row)):  # each new token completes a new bigram
                earlier = set(zip(row[: j - 1], row[1:j], strict=True))
                assert (row[j - 1], row[j]) not in earlier, (name, row, j)


def test_compiled_once_across_config_values_with_a_custom_processor(target):
    prompt, lengths = ragged_prompts()
    run = lambda config: generate(
        target,
        prompt,
        prompt_lengths=lengths,
        key=jax.random.key(0),  # noqa: E731
        config=config,
        max_new_tokens=5,
        processors=PROCESSORS,
    )
    run(SamplingConfig(temperature=0.7, top_k=3, repetition_penalty=1.1))
    traced = TRACES["process"]
    run(SamplingConfig(temperature=1.3, top_k=6, repetition_penalty=1.5))
    run(SamplingConfig(temperature=0.0, top_k=0, repetition_penalty=1.0))
    chained_again = chain(BAN_PREVIOUS, DEFAULT_PROCESSORS)  # an equal chain: the same program
    generate(
        target,
        prompt,
        prompt_lengths=lengths,
        key=jax.random.key(1),
        config=CONFIG,
        max_new_tokens=5,
        processors=chained_again,
    )
    assert TRACES["process"] == traced


def test_importing_sampling_imports_no_decoder():
    code = "import sys, rtdlm.sampling; assert 'rtdlm.decoding' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_functions_are_stateless_processors():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 10)), jnp.float32)
    halve = lambda logits, config, state: logits / 2  # noqa: E731
    out = process_logits(logits, SamplingConfig(), processors=chain(halve, DEFAULT_PROCESSORS))
    np.testing.assert_allclose(np.asarray(out), np.asarray(logits) / 2, rtol=1e-6)
    result = jax.jit(sample, static_argnames="processors")(
        jax.random.key(0), logits, SamplingConfig(), processors=halve
    )
    assert result.token_id.shape == (3,)


# ---- emit_accepted ---------------------------------------------------------------------------
def test_emit_accepted_cuts_at_eos_and_width():
    tokens = jnp.full((4, 6), -7, jnp.int32).at[:, 0].set(9)
    emitted = jnp.array([1, 1, 4, 1])
    last = jnp.array([9, 9, 9, 9])
    done = jnp.array([False, False, False, True])
    drafts = jnp.array([[1, 2], [1, 5], [1, 2], [1, 2]])  # row 1: draft 5 is the EOS
    out = emit_accepted(
        tokens,
        emitted,
        last,
        done,
        drafts,
        jnp.array([2, 2, 2, 1]),
        jnp.array([3, 3, 3, 3]),
        eos=jnp.full(4, 5),
        pad_token_id=0,
    )
    np.testing.assert_array_equal(np.asarray(out.count), [3, 2, 2, 0])
    np.testing.assert_array_equal(
        np.asarray(out.tokens),
        [[9, 1, 2, 3, -7, -7], [9, 1, 5, -7, -7, -7], [9, -7, -7, -7, 1, 2], [9, -7, -7, -7, -7, -7]],
    )
    np.testing.assert_array_equal(np.asarray(out.last), [3, 5, 2, 9])
    np.testing.assert_array_equal(np.asarray(out.done), [False, True, True, True])


# ---- n-gram processors against Hugging Face's ------------------------------------------------
def _our_mask(processor, input_ids, vocab):
    config = SamplingConfig()
    state = init_from_history(processor, input_ids, vocab, config)
    logits = jnp.zeros((input_ids.shape[0], vocab), jnp.float32)
    return np.isinf(np.asarray(jax.jit(processor.process)(logits, config, state)))


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hugging_face(ngram_size):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(ngram_size)
    vocab = 12
    for length in (1, 2, 5, 30):
        input_ids = rng.integers(0, 4, size=(16, length))  # few ids: many repeats
        scores = torch.zeros((16, vocab))
        hf = transformers.NoRepeatNGramLogitsProcessor(ngram_size)(torch.tensor(input_ids), scores)
        ours = _our_mask(no_repeat_ngram(ngram_size), jnp.asarray(input_ids, jnp.int32), vocab)
        np.testing.assert_array_equal(ours, np.isinf(hf.numpy()), err_msg=f"length {length}")


def test_bad_words_match_hugging_face():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(5)
    vocab = 12
    words = [[7], [1, 2], [3, 3, 1], [0, 1, 2, 3]]
    for length in (1, 3, 20):
        input_ids = rng.integers(0, 4, size=(32, length))
        scores = torch.zeros((32, vocab))
        hf = transformers.NoBadWordsLogitsProcessor(words, eos_token_id=11)(torch.tensor(input_ids), scores)
        ours = _our_mask(bad_words(words), jnp.asarray(input_ids, jnp.int32), vocab)
        np.testing.assert_array_equal(ours, np.isinf(hf.numpy()), err_msg=f"length {length}")


def test_ngram_processors_against_a_plain_python_rule():
    """The same rules spelled out in Python (runs without torch)."""
    rng = np.random.default_rng(6)
    vocab, words = 6, [[4], [1, 2], [2, 2, 0]]
    input_ids = rng.integers(0, 3, size=(64, 9))
    ngram = _our_mask(no_repeat_ngram(3), jnp.asarray(input_ids, jnp.int32), vocab)
    banned_words = _our_mask(bad_words(words), jnp.asarray(input_ids, jnp.int32), vocab)
    for b, row in enumerate(input_ids.tolist()):
        expected = {row[i + 2] for i in range(len(row) - 2) if row[i : i + 2] == row[-2:]}
        assert set(np.flatnonzero(ngram[b]).tolist()) == expected
        expected = {w[-1] for w in words if len(w) == 1 or row[-(len(w) - 1) :] == w[:-1]}
        assert set(np.flatnonzero(banned_words[b]).tolist()) == expected


def test_ngram_factory_arguments():
    assert no_repeat_ngram(3) is no_repeat_ngram(3)  # built once: one compiled program
    with pytest.raises(ValueError, match="ngram_size"):
        no_repeat_ngram(0)
    with pytest.raises(ValueError, match="window"):
        no_repeat_ngram(4, window=3)
    with pytest.raises(ValueError, match="bad_words"):
        bad_words([[]])
    with pytest.raises(TypeError, match="bad_words"):
        bad_words([["a"]])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SamplingConfig(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="bad_words_ids"):
        SamplingConfig(bad_words_ids=[[1, -2]])
    config = SamplingConfig.from_generation_config({"no_repeat_ngram_size": 3, "bad_words_ids": [[1, 2]]})
    assert config.no_repeat_ngram_size == 3 and config.bad_words_ids == ((1, 2),)
