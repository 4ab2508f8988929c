"""Tests of `rtdlm.decoding.prompt_lookup_generate`: the n-gram search against a brute-force
reference, lossless sampling (exact target distribution), greedy identity with `generate`,
rows with and without matches, EOS and max_new_tokens inside a round, compilation, bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov_reference import check_eos_rows, chisquare_pvalue, greedy_chain, markov_joint

from rtdlm.decoding import generate, prompt_lookup_generate
from rtdlm.decoding import speculative as speculative_module
from rtdlm.decoding.common import cond_in_place
from rtdlm.decoding.prompt_lookup import NO_DRAFT, PromptLookup, context_tokens, lookup_drafts
from rtdlm.decoding.speculative import Round
from rtdlm.decoding.testing import WideCacheModel, random_markov_model
from rtdlm.sampling import SamplingConfig, chain

VOCAB = 8
# Repeated 1-, 2- and 3-grams: the first rounds find matches of every length, and misses.
PROMPT = np.array([3, 1, 5, 2, 3, 1, 5, 7, 3, 1], np.int32)
BIG_ROWS = 200_000  # a joint off by 1 point in its top cell is rejected with power > 0.99
P_MIN = 1e-4


@pytest.fixture(scope="module")
def target():
    return random_markov_model(VOCAB, seed=0)


# ---------------------------------------------------------------------------------------
# The search: against a plain Python reference.


def reference_drafts(row, ngram_size, k):
    """The latest earlier occurrence of the longest matching suffix (n <= ngram_size),
    continued periodically where it overlaps the suffix; NO_DRAFT without a match."""
    row = list(row)
    t = len(row)
    for n in range(min(ngram_size, t), 0, -1):
        suffix = row[t - n :]
        for end in range(t - 2, n - 2, -1):  # an occurrence ends at end <= t - 2
            if row[end - n + 1 : end + 1] == suffix:
                period = t - 1 - end
                return [row[end + 1 + j % period] for j in range(k)], n
    return [NO_DRAFT] * k, 0


def test_lookup_matches_the_reference(rng):
    batch, width = 64, 24
    for ngram_size in (1, 2, 3, 4):
        for k in (1, 3, 6):
            vocab = int(rng.integers(2, 6))
            context = rng.integers(0, vocab, (batch, width)).astype(np.int32)
            length = rng.integers(1, width + 1, batch).astype(np.int32)
            padded = np.where(np.arange(width)[None] < length[:, None], context, NO_DRAFT)
            drafts, matched = lookup_drafts(jnp.asarray(padded), jnp.asarray(length), ngram_size, k)
            for b in range(batch):
                want, n = reference_drafts(context[b, : length[b]], ngram_size, k)
                assert np.asarray(drafts[b]).tolist() == want, (ngram_size, k, context[b, : length[b]])
                assert int(matched[b]) == n


def test_lookup_examples():
    context = jnp.asarray(
        [
            [1, 2, 3, 4, 5, 1, 2, 3, -1, -1],  # 3-gram match: what followed it
            [7, 7, 7, 7, -1, -1, -1, -1, -1, -1],  # overlapping match: the run continues
            [1, 2, 3, 4, 5, 6, -1, -1, -1, -1],  # the last token never occurred before
            [5, 6, 5, 6, 9, 5, 6, -1, -1, -1],  # 2-gram fallback, the latest occurrence
            [4, -1, -1, -1, -1, -1, -1, -1, -1, -1],  # a single token: nothing earlier
        ],
        jnp.int32,
    )
    drafts, matched = lookup_drafts(context, jnp.asarray([8, 4, 6, 7, 1]), 3, 4)
    assert np.asarray(drafts).tolist() == [
        [4, 5, 1, 2],
        [7, 7, 7, 7],
        [-1, -1, -1, -1],
        [9, 5, 6, 9],
        [-1, -1, -1, -1],
    ]
    assert np.asarray(matched).tolist() == [3, 3, 0, 2, 0]


def test_context_is_the_prompt_then_the_output():
    prompt = jnp.asarray([[1, 2, 9, 9], [3, 4, 5, 6]], jnp.int32)
    tokens = jnp.asarray([[7, 8, 0], [1, 0, 0]], jnp.int32)
    context, length = context_tokens(prompt, jnp.asarray([2, 4]), tokens, jnp.asarray([2, 1]))
    assert np.asarray(context).tolist() == [[1, 2, 7, 8, -1, -1, -1], [3, 4, 5, 6, 1, -1, -1]]
    assert np.asarray(length).tolist() == [4, 5]


# ---------------------------------------------------------------------------------------
# Lossless: the first three new tokens follow the target's processed distribution exactly.

CONFIGS = {
    "temperature_1": SamplingConfig(temperature=1.0),
    "temperature_0.7_top_k_top_p": SamplingConfig(temperature=0.7, top_k=5, top_p=0.8),
    "repetition_penalty_1.3": SamplingConfig(repetition_penalty=1.3),
}


def lossless_run(target, name, k, ngram_size=3):
    prompt = jnp.asarray(np.tile(PROMPT, (BIG_ROWS, 1)))
    out = prompt_lookup_generate(
        target,
        prompt,
        key=jax.random.key(200 + k),
        config=CONFIGS[name],
        max_new_tokens=3,
        num_speculative_tokens=k,
        ngram_size=ngram_size,
    )
    return out, markov_joint(target.table, PROMPT, 3, CONFIGS[name])


@pytest.mark.parametrize(
    "name, k",
    [
        ("temperature_1", 4),
        ("temperature_0.7_top_k_top_p", 4),
        pytest.param("temperature_1", 1, marks=pytest.mark.slow),
        pytest.param("temperature_0.7_top_k_top_p", 2, marks=pytest.mark.slow),
        pytest.param("repetition_penalty_1.3", 4, marks=pytest.mark.slow),
    ],
)
def test_lossless_joint_of_first_three_tokens(target, name, k):
    out, joint = lossless_run(target, name, k)
    tokens = np.asarray(out.tokens)
    pvalue = chisquare_pvalue(tokens, joint)
    drafted, accepted = np.asarray(out.num_drafted), np.asarray(out.num_accepted)
    rate = accepted.sum() / drafted.sum()
    print(
        f"prompt lookup {name} K={k}: chi-square p = {pvalue:.4g}, acceptance {rate:.3f}, "
        f"rows accepting {np.mean(accepted > 0):.3f}"
    )
    assert pvalue > P_MIN, pvalue
    assert np.all((drafted == k) | (drafted == 2 * k))  # the prefill's token, then 1 or 2 rounds
    # Some rows accepted a draft, most accepted none (a miss or a rejection).
    assert 0.02 < np.mean(accepted > 0) < 0.9 and 0 < rate < 0.5
    if name == "temperature_1" and k == 4:
        # The test has power: the same draws reject a joint with one cell 1 point off.
        wrong = joint.reshape(-1).copy()
        top = np.argmax(wrong)
        wrong[top] += 0.01
        others = np.arange(wrong.size) != top
        wrong[others] *= (1 - wrong[top]) / wrong[others].sum()
        wrong_pvalue = chisquare_pvalue(tokens, wrong.reshape(joint.shape))
        print(f"  top cell {joint.reshape(-1)[top]:.3f} + 0.01: chi-square p = {wrong_pvalue:.3g}")
        assert wrong_pvalue < P_MIN, wrong_pvalue


# ---------------------------------------------------------------------------------------
# Greedy identity, ragged rows, EOS: 64 right-padded rows, 101 new tokens (prime).

RAGGED = [[4, 2, 6, 1, 3], [5, 0], [7, 7, 2, 4], [6], [2, 2, 2], [0, 1, 2, 3, 4], [3], [1, 6]]
SMALL_ROWS = 64
SMALL_NEW_TOKENS = 101


def small_batch():
    rows = [RAGGED[b % len(RAGGED)] for b in range(SMALL_ROWS)]
    prompt = np.full((SMALL_ROWS, 5), 1, np.int32)  # padding: a real token id, on purpose
    for b, row in enumerate(rows):
        prompt[b, : len(row)] = row
    return rows, jnp.asarray(prompt), jnp.asarray([len(r) for r in rows], jnp.int32)


def run_small(model, k, config, key=0, max_new_tokens=SMALL_NEW_TOKENS, **kwargs):
    _, prompt, lengths = small_batch()
    return prompt_lookup_generate(
        model,
        prompt,
        key=jax.random.key(key),
        config=config,
        max_new_tokens=max_new_tokens,
        num_speculative_tokens=k,
        prompt_lengths=lengths,
        **kwargs,
    )


def run_generate(model, config, max_new_tokens=SMALL_NEW_TOKENS, **kwargs):
    _, prompt, lengths = small_batch()
    return generate(
        model,
        prompt,
        key=jax.random.key(0),
        config=config,
        max_new_tokens=max_new_tokens,
        prompt_lengths=lengths,
        **kwargs,
    )


def check_counts(out, k, max_new_tokens):
    drafted, accepted = np.asarray(out.num_drafted), np.asarray(out.num_accepted)
    assert drafted.shape == accepted.shape == (out.tokens.shape[0],)
    assert np.all(drafted % k == 0)
    assert np.all((accepted >= 0) & (accepted <= drafted))
    assert np.all(drafted <= k * (max_new_tokens - 1))  # every round emits at least one token
    return drafted, accepted


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.6),
        dict(do_sample=False, repetition_penalty=1.6, eos=3),  # some rows stop early, others not
    ],
)
def test_greedy_identical_to_generate(target, k, params):
    params = dict(params)
    eos = params.pop("eos", None)
    config = SamplingConfig(**params)
    out = run_small(target, k, config, eos_token_id=eos)
    reference = run_generate(target, config, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(reference.lengths))
    drafted, accepted = check_counts(out, k, SMALL_NEW_TOKENS)
    assert accepted.sum() > 0
    if eos is None:
        rows, _, _ = small_batch()
        penalty = params.get("repetition_penalty", 1.0)
        for b in range(len(RAGGED)):
            chain = greedy_chain(target.table, rows[b], SMALL_NEW_TOKENS, penalty)
            np.testing.assert_array_equal(np.asarray(out.tokens[b]), chain, err_msg=f"row {b}")
    else:
        stopped = check_eos_rows(out.tokens, out.lengths, eos, 0)
        assert 0 < stopped < SMALL_ROWS


def test_rows_with_and_without_matches(target):
    """One row's prompt is a stretch of the greedy chain (periodic, so every token recurs
    and every draft is accepted), one row's single prompt token never recurs at first
    (nothing to draft), one is ordinary."""
    n, k = 40, 4
    chain = greedy_chain(target.table, [2], 2 * n)
    copy_row = np.concatenate([[2], chain[:n]])  # the output continues it: chain[n:]
    fresh = next(t for t in range(VOCAB) if t not in greedy_chain(target.table, [t], 3))
    prompt = np.zeros((3, len(copy_row)), np.int32)
    prompt[0] = copy_row
    prompt[1, 0] = fresh
    prompt[2, :5] = RAGGED[0]
    lengths = jnp.asarray([len(copy_row), 1, 5], jnp.int32)
    config = SamplingConfig(temperature=0.0)
    common = dict(key=jax.random.key(0), config=config, max_new_tokens=n, prompt_lengths=lengths)
    out = prompt_lookup_generate(target, jnp.asarray(prompt), num_speculative_tokens=k, **common)
    reference = generate(target, jnp.asarray(prompt), **common)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), chain[n:])
    drafted, accepted = check_counts(out, k, n)
    assert accepted[0] == drafted[0]  # the copy row: every draft accepted
    assert drafted[0] == k * -(-(n - 1) // (k + 1))  # ... so it needs the fewest rounds
    assert accepted[1] < drafted[1]  # the fresh row missed at least once


def test_one_token_matches_skip_the_verify_pass(target):
    """A round where no row matched two or more tokens proposes no drafts (so none can be
    accepted) and tells the verify pass to feed only the last token."""
    round_of = lambda context: Round(
        last=jnp.asarray(context[:, -1]),
        position=jnp.full((1,), context.shape[1] - 1, jnp.int32),
        processor_state=(),
        prompt=jnp.asarray(context),
        prompt_lengths=jnp.full((1,), context.shape[1], jnp.int32),
        tokens=jnp.zeros((1, 4), jnp.int32),
        emitted=jnp.zeros((1,), jnp.int32),
    )
    lookup, config = PromptLookup(ngram_size=3), SamplingConfig(temperature=0.0)
    propose = lambda context: lookup.propose(target, None, round_of(context), None, chain(), config, 3)
    one_token = propose(np.array([[4, 6, 2, 4]], np.int32))  # only "4" recurs
    assert np.all(np.asarray(one_token.drafts) == NO_DRAFT) and not bool(one_token.saved[1])
    two_tokens = propose(np.array([[4, 6, 2, 4, 6]], np.int32))  # "4 6" recurs: drafts "2 4 6"
    np.testing.assert_array_equal(np.asarray(two_tokens.drafts), [[2, 4, 6]])
    assert bool(two_tokens.saved[1])


def test_cond_in_place_equals_cond_without_a_copy():
    shape = (256, 1024)  # 1 MiB: the "cache"

    def branches(fun, pred, x, cache):
        add = lambda o: (o[0] + 1, o[1].at[0].set(o[0]))
        double = lambda o: (o[0] * 2, o[1].at[1].set(-o[0]))
        return fun(pred, add, double, (x, cache))

    for pred in (True, False):
        want = jax.jit(functools.partial(branches, jax.lax.cond))(pred, 3.0, jnp.ones(shape))
        got = jax.jit(functools.partial(branches, cond_in_place))(pred, 3.0, jnp.ones(shape))
        jax.tree.map(np.testing.assert_array_equal, got, want)

    def loop(fun):  # a cache made and carried inside the program, as in the decoders
        def run(x):
            step = lambda carry, i: (branches(fun, i % 3 == 0, *carry), None)
            x, cache = jax.lax.scan(step, (x, jnp.zeros(shape)), jnp.arange(6))[0]
            return x, jnp.sum(cache, axis=1)

        return jax.jit(run)

    jax.tree.map(np.testing.assert_array_equal, loop(cond_in_place)(3.0), loop(jax.lax.cond)(3.0))


def test_the_loop_holds_one_kv_cache(target):
    """The verify pass's choice of width updates the cache in place (with lax.cond in its
    place, this program's temporary memory is 2x the cache)."""
    wide = WideCacheModel(target)

    def run(model, prompt):
        config = SamplingConfig(temperature=0.0)
        return prompt_lookup_generate(model, prompt, key=jax.random.key(0), config=config, max_new_tokens=40)

    prompt = jnp.asarray(np.tile(PROMPT, (8, 1)))
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(wide.init_cache(8, 16 + 64 + 4)))
    compiled = jax.jit(lambda m, p: run(m, p).tokens).lower(wide, prompt).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 1.25 * cache_bytes
    np.testing.assert_array_equal(
        np.asarray(run(wide, prompt).tokens), np.asarray(run(target, prompt).tokens)
    )


def test_max_new_tokens_inside_a_round(target):
    """Widths that end mid-round (every draft accepted would overshoot): same as generate."""
    config = SamplingConfig(temperature=0.0)
    for max_new_tokens in (1, 7):  # 7 = the prefill token + a full round + one slot of the next
        out = run_small(target, 4, config, max_new_tokens=max_new_tokens)
        reference = run_generate(target, config, max_new_tokens=max_new_tokens)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), max_new_tokens)
        check_counts(out, 4, max_new_tokens)


def test_eos_stops_rows_individually(target):
    eos, pad, k = 2, -1, 4  # pad -1 is no token id: every real output position is visible
    out = run_small(target, k, SamplingConfig(temperature=1.5), key=11, eos_token_id=eos, pad_token_id=pad)
    tokens = np.asarray(out.tokens)
    stopped = check_eos_rows(tokens, out.lengths, eos, pad)
    lengths = np.asarray(out.lengths)
    assert stopped > SMALL_ROWS // 2 and len(set(lengths.tolist())) > 10
    assert np.all(tokens[np.arange(SMALL_NEW_TOKENS) < lengths[:, None]] >= 0)
    drafted, _ = check_counts(out, k, SMALL_NEW_TOKENS)
    assert np.all(drafted <= k * (lengths - 1))
    assert np.all(drafted[lengths == 1] == 0)


def test_outputs_equal_generate(target):
    """Logprobs (both modes, top-3) and stops: for the same greedy tokens, what generate reports."""
    config = SamplingConfig(temperature=0.0, repetition_penalty=1.3)
    stops = dict(stop_token_ids=[5], stop_sequences=[[1, 3]])
    for mode in ("processed", "raw"):
        args = dict(logprobs_mode=mode, num_top_logprobs=3, **stops)
        out = run_small(target, 4, config, max_new_tokens=30, **args)
        reference = run_generate(target, config, max_new_tokens=30, **args)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(reference.lengths))
        assert 0 < int(np.sum(np.asarray(out.lengths) < 30)) < SMALL_ROWS  # some rows stopped
        for field in ("logprobs", "top_logprobs"):
            np.testing.assert_allclose(getattr(out, field), getattr(reference, field), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.top_token_ids), np.asarray(reference.top_token_ids))


def test_compiled_once_across_configs(target):
    configs = [
        SamplingConfig(temperature=1.0, top_k=0, top_p=1.0),
        SamplingConfig(temperature=0.7, top_k=5, top_p=0.9),
        SamplingConfig(temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=1.3),
        SamplingConfig(temperature=1.4, top_k=2, top_p=0.95, min_p=0.1),
        SamplingConfig(temperature=2.0, top_k=7, top_p=0.97),
    ]
    outputs = []
    for i, config in enumerate(configs):
        outputs.append(np.asarray(run_small(target, 4, config, key=i).tokens))
        if i == 0:
            size = speculative_module.speculative_loop._cache_size()
    assert speculative_module.speculative_loop._cache_size() == size
    assert len({o.tobytes() for o in outputs}) == len(configs)
    run_small(random_markov_model(VOCAB, seed=5), 4, configs[1], eos_token_id=3)  # new weights, EOS
    assert speculative_module.speculative_loop._cache_size() == size


def test_bad_input(target):
    prompt = jnp.asarray(PROMPT[None])
    kwargs = dict(key=jax.random.key(0), config=SamplingConfig(), max_new_tokens=4)
    for n in (0, -1):
        with pytest.raises(ValueError, match="ngram_size"):
            prompt_lookup_generate(target, prompt, ngram_size=n, **kwargs)
    for n in (2.0, "3", True, None):
        with pytest.raises(TypeError, match="ngram_size"):
            prompt_lookup_generate(target, prompt, ngram_size=n, **kwargs)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        prompt_lookup_generate(target, prompt, num_speculative_tokens=0, **kwargs)
    with pytest.raises(TypeError, match="num_speculative_tokens"):
        prompt_lookup_generate(target, prompt, num_speculative_tokens=2.0, **kwargs)
    with pytest.raises(ValueError, match="prompt_lengths"):
        prompt_lookup_generate(target, prompt, prompt_lengths=[11], **kwargs)
    with pytest.raises(TypeError, match="config"):
        prompt_lookup_generate(target, prompt, key=jax.random.key(0), config=None, max_new_tokens=4)


# ---------------------------------------------------------------------------------------
# The bundled byte-level model.


@pytest.mark.slow
def test_greedy_identical_to_generate_bundled_model():
    from rtdlm import models

    if "target" not in models.bundled_models():
        pytest.skip("no bundled target model in rtdlm/models/weights/")
    model = models.load_model("target")
    texts = ["def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n", "import os\n", "class Stack:\n    "]
    encoded = [models.encode(t) for t in texts]
    prompt = np.zeros((len(texts), max(len(e) for e in encoded)), np.int32)
    for b, e in enumerate(encoded):
        prompt[b, : len(e)] = e
    common = dict(
        key=jax.random.key(0),
        config=SamplingConfig(temperature=0.0),
        max_new_tokens=48,
        prompt_lengths=jnp.asarray([len(e) for e in encoded], jnp.int32),
    )
    out = prompt_lookup_generate(model, jnp.asarray(prompt), num_speculative_tokens=4, **common)
    reference = generate(model, jnp.asarray(prompt), **common)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    assert int(np.sum(out.num_accepted)) > 0
