"""Compile once: `generate` does not recompile for new lengths within a bucket or for new
stream callbacks, bucket padding never changes a token, and the text stream holds back
incomplete UTF-8 sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.decoding import generate
from rtdlm.decoding import loop as loop_module
from rtdlm.decoding.common import bucketed_widths, length_bucket
from rtdlm.decoding.loop import TextStream
from rtdlm.decoding.testing import random_markov_model
from rtdlm.models import decode
from rtdlm.sampling import SamplingConfig

VOCAB = 8
SAMPLING = SamplingConfig(temperature=1.0, top_k=5, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def model():
    return random_markov_model(VOCAB, seed=3)


def run(model, prompt, max_new_tokens, config=SAMPLING, **kwargs):
    prompt = np.asarray(prompt, np.int32)
    return generate(
        model, prompt, key=jax.random.key(5), config=config, max_new_tokens=max_new_tokens, **kwargs
    )


def compiles(fn) -> int:
    """How many new `generate` programs `fn()` compiled."""
    before = loop_module._generate._cache_size()
    jax.block_until_ready(fn())
    return loop_module._generate._cache_size() - before


def test_buckets():
    assert [length_bucket(n) for n in (1, 16, 17, 32, 33, 100, 1000)] == [16, 16, 32, 32, 64, 128, 1024]
    # Above 256, also 3/4 of each power of two: a long prompt pads by at most a third.
    long = (256, 257, 384, 385, 512, 513, 769)
    assert [length_bucket(n) for n in long] == [256, 384, 384, 512, 512, 768, 1024]
    assert bucketed_widths(5, 10, None) == (16, 16)
    assert bucketed_widths(5, 10, 40) == (16, 16)
    assert bucketed_widths(20, 5, 40) == (32, 8)  # the output bucket shrinks to fit
    assert bucketed_widths(20, 10, 40) == (20, 10)  # else the exact widths (checked to fit)


def test_lengths_within_a_bucket_compile_once(model):
    prompts = [np.tile(np.arange(width) % VOCAB, (2, 1)) for width in (3, 9, 16)]
    jax.block_until_ready(run(model, prompts[0], 5).tokens)
    total = 0
    for prompt in prompts:
        for max_new_tokens in (1, 7, 16, [3, 16]):
            total += compiles(lambda p=prompt, n=max_new_tokens: run(model, p, n).tokens)
    assert total == 0
    assert compiles(lambda: run(model, prompts[0], 17).tokens) == 1  # the next output bucket


def test_padding_never_changes_a_token(model):
    """One prompt in different prompt and output buckets: identical tokens and logprobs."""
    prompt = np.array([[3, 1, 5, 2, 6], [4, 4, 0, 1, 1]], np.int32)
    lengths = np.array([5, 3], np.int32)
    small = run(model, prompt, 10, prompt_lengths=lengths)
    wide_prompt = np.pad(prompt, ((0, 0), (0, 30)), constant_values=7)  # bucket 64, not 16
    large = run(model, wide_prompt, 40, prompt_lengths=lengths)  # output bucket 64, not 16
    assert small.tokens.shape == (2, 10) and large.tokens.shape == (2, 40)
    np.testing.assert_array_equal(np.asarray(small.tokens), np.asarray(large.tokens[:, :10]))
    np.testing.assert_allclose(np.asarray(small.logprobs), np.asarray(large.logprobs[:, :10]), atol=1e-6)


def test_per_row_max_new_tokens(model):
    prompt = np.tile([[2, 5, 1]], (3, 1))
    out = run(model, prompt, [4, 9, 1], pad_token_id=-1)
    full = run(model, prompt, 9)
    assert out.tokens.shape == (3, 9)
    np.testing.assert_array_equal(np.asarray(out.lengths), [4, 9, 1])
    for row, limit in enumerate((4, 9, 1)):
        np.testing.assert_array_equal(
            np.asarray(out.tokens[row, :limit]), np.asarray(full.tokens[row, :limit])
        )
        assert np.all(np.asarray(out.tokens[row, limit:]) == -1)
        assert np.all(np.asarray(out.logprobs[row, limit:]) == 0.0)


def test_seed_and_token_lists_compile_once(model):
    """seed None -> a value, logit_bias / banned_token_ids added or of a new length (up to
    16 ids): the same program, and the same tokens as each config gives alone."""
    prompt = np.tile([[1, 2, 3]], (2, 1))
    configs = [
        SAMPLING,
        SAMPLING.replace(seed=7),
        SAMPLING.replace(seed=8, logit_bias={3: 2.0}),
        SAMPLING.replace(logit_bias={3: 2.0, 5: -1.0, 6: 0.5}, banned_token_ids=[4]),
        SAMPLING.replace(seed=1, banned_token_ids=[4, 0, 2]),
    ]
    jax.block_until_ready(run(model, prompt, 6, configs[0]).tokens)
    assert sum(compiles(lambda c=c: run(model, prompt, 6, c).tokens) for c in configs[1:]) == 0
    seeded = run(model, prompt, 6, configs[1]).tokens
    assert not np.array_equal(np.asarray(seeded), np.asarray(run(model, prompt, 6, configs[0]).tokens))
    banned = np.asarray(run(model, prompt, 12, configs[4]).tokens)
    assert not np.isin(banned, [4, 0, 2]).any()


def test_stable_structure_keeps_the_random_streams(model):
    """The same draws as `sample` with the config as given: seed None, scalar and per row."""
    from rtdlm.decoding.common import stable_structure, step_keys
    from rtdlm.sampling import row_keys

    key = jax.random.key(4)
    for seed in (None, 5, np.array([3, 9], np.uint32)):
        config = SAMPLING.replace(seed=seed)
        stable, seeded = stable_structure(config)
        want = jax.random.key_data(row_keys(key, config, 2))
        np.testing.assert_array_equal(jax.random.key_data(step_keys(key, stable, seeded, 2)), want)


def test_fresh_stream_functions_compile_once(model):
    prompt = np.tile([[1, 2, 3]], (2, 1))
    seen = []
    jax.block_until_ready(run(model, prompt, 6, stream=lambda step, tokens: None).tokens)
    for i in range(3):  # a new lambda each time, as in a notebook cell
        count = compiles(
            lambda i=i: run(model, prompt, 6, stream=lambda step, tokens: seen.append((i, int(step))))
        )
        assert count == 0
    jax.effects_barrier()
    assert seen == [(i, step) for i in range(3) for step in range(6)]


def test_streaming_and_plain_runs_share_one_program(model):
    if not loop_module._plain_runs_stream_branch():
        pytest.skip("plain runs compile without the stream branch here (devices or cache)")
    prompt = np.tile([[1, 2, 3]], (2, 1))
    plain = run(model, prompt, 6)
    seen, streamed = [], []

    def streaming_run():
        streamed.append(run(model, prompt, 6, stream=lambda step, tokens: seen.append(int(step))))
        return streamed[-1].tokens

    assert compiles(streaming_run) == 0  # the plain run's program streams too
    assert compiles(lambda: run(model, prompt, 6).tokens) == 0
    jax.effects_barrier()
    assert seen == list(range(6))
    np.testing.assert_array_equal(streamed[0].tokens, plain.tokens)


def test_with_the_persistent_cache_plain_runs_compile_without_callbacks(model, monkeypatch):
    """JAX's persistent cache cannot store a program with host callbacks, and ordered
    callbacks run on one device only: there, a plain run gets its own program, and a
    streaming run the shared one. (Neither the cache nor devices are switched on here: they
    are process-wide state; the compile benchmark's demo runs show the cache.)"""
    prompt = np.tile([[1, 2, 3]], (2, 1))
    plain = run(model, prompt, 6)
    monkeypatch.setattr(loop_module, "_plain_runs_stream_branch", lambda: False)
    assert compiles(lambda: run(model, prompt, 6, stream=lambda step, tokens: None).tokens) == 0
    cached = []
    assert compiles(lambda: cached.append(run(model, prompt, 6)) or cached[0].tokens) == 1
    np.testing.assert_array_equal(cached[0].tokens, plain.tokens)


def test_stream_inside_an_outer_jit(model):
    """A stream registered while tracing stays registered: the program can run again."""
    seen = []
    prompt = np.tile([[1, 2, 3]], (2, 1))
    stream = lambda step, tokens: seen.append(int(step))
    program = jax.jit(lambda p: generate(model, p, key=jax.random.key(5), config=SAMPLING,
                                         max_new_tokens=4, stream=stream).tokens)  # fmt: skip
    for _ in range(2):
        jax.block_until_ready(program(prompt))
    jax.effects_barrier()
    assert seen == [0, 1, 2, 3] * 2


def test_stream_stops_with_the_rows(model):
    """Steps after every row is done call no stream; finished rows' tokens are padding."""
    steps = []
    out = run(model, np.array([[1, 2]]), [3], stream=lambda step, tokens: steps.append(int(step)))
    jax.effects_barrier()
    assert steps == [0, 1, 2] and int(out.lengths[0]) == 3


def test_text_stream_holds_back_incomplete_utf8():
    text = "a€b😀"  # 1, 3, 1 and 4 bytes
    ids = list(text.encode("utf-8"))
    stream = TextStream(decode, batch=2)
    pieces = [stream(np.array([i, ord("x")]), np.array([True, k < 2])) for k, i in enumerate(ids)]
    row0 = [p[0] for p in pieces]
    assert row0 == ["a", "", "", "€", "b", "", "", "", "😀"]
    assert [p[1] for p in pieces] == ["x", "x"] + [""] * 7  # row 1 finished after two tokens


def test_generate_streams_text():
    """stream_text: a row's streamed pieces concatenate to its decoded tokens (all of them
    unless the row ends inside a UTF-8 sequence); no piece ends inside one."""
    from rtdlm.models import load_model

    prompt = jnp.asarray([list("π = ".encode())] * 2)
    pieces = [[], []]

    def stream(step, tokens, texts):
        for row, text in enumerate(texts):
            pieces[row].append(text)

    config = SamplingConfig(temperature=1.3, top_k=0)
    out = generate(
        load_model("target"),
        prompt,
        key=jax.random.key(2),
        config=config,
        max_new_tokens=48,
        stream=stream,
        stream_text=decode,
    )
    jax.effects_barrier()
    for row in range(2):
        whole, streamed = decode(np.asarray(out.tokens[row])), "".join(pieces[row])
        assert streamed == whole or (whole.endswith("\ufffd") and whole.startswith(streamed))
        assert not any(piece.endswith("\ufffd") for piece in pieces[row])


def test_stream_text_needs_a_stream(model):
    with pytest.raises(ValueError, match="stream_text"):
        run(model, np.array([[1]]), 3, stream_text=decode)


@pytest.mark.parametrize(
    "max_new_tokens, error",
    [(0, ValueError), ([2, 0], ValueError), (2.5, TypeError), ([3], ValueError), (True, TypeError)],
)
def test_bad_max_new_tokens(model, max_new_tokens, error):
    with pytest.raises(error, match="max_new_tokens"):
        run(model, np.array([[1], [2]]), max_new_tokens)


def test_speculative_lengths_within_a_bucket_compile_once(model):
    from rtdlm.decoding import speculative as speculative_module
    from rtdlm.decoding import speculative_generate

    draft = random_markov_model(VOCAB, seed=4)
    prompt = np.array([[3, 1, 5, 2], [4, 4, 0, 1]], np.int32)

    def spec(prompt, max_new_tokens, **kwargs):
        return speculative_generate(
            model,
            draft,
            prompt,
            key=jax.random.key(1),
            config=SAMPLING,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )

    small = spec(prompt, 10)
    before = speculative_module.speculative_loop._cache_size()
    for width, max_new_tokens in ((2, 3), (4, 16), (3, [5, 12])):
        jax.block_until_ready(spec(prompt[:, :width], max_new_tokens).tokens)
    assert speculative_module.speculative_loop._cache_size() == before
    large = spec(np.pad(prompt, ((0, 0), (0, 20))), 40, prompt_lengths=np.array([4, 4]))  # other buckets
    np.testing.assert_array_equal(np.asarray(small.tokens), np.asarray(large.tokens[:, :10]))
