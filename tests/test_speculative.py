"""Tests of `rtdlm.decoding.speculative_generate`: lossless (exact target distribution),
greedy identity with `generate`, acceptance bookkeeping, EOS, compilation, bad input.

Two compiled shapes per K keep the file fast: a big batch of identical prompts (3 new
tokens, for the distribution tests) and a small ragged batch (101 new tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov_reference import check_eos_rows, chisquare_pvalue, greedy_chain, markov_joint

from rtdlm.decoding import GenerationOutput, SpeculativeDecoder, generate, speculative_generate
from rtdlm.decoding import speculative as speculative_module
from rtdlm.decoding.testing import MarkovModel, random_markov_model
from rtdlm.sampling import SamplingConfig

VOCAB = 8
PROMPT = np.array([3, 1, 5], np.int32)
BIG_ROWS = 60_000
P_MIN = 1e-4
KS = (1, 2, 4)


@pytest.fixture(scope="module")
def target():
    return random_markov_model(VOCAB, seed=0)


@pytest.fixture(scope="module")
def draft(target):
    """A different table, correlated with the target's: every acceptance count occurs."""
    return MarkovModel(target.table + random_markov_model(VOCAB, seed=1, scale=1.2).table)


def big_prompt():
    return jnp.asarray(np.tile(PROMPT, (BIG_ROWS, 1)))


def check_counts(out, k, max_new_tokens):
    """num_drafted / num_accepted: [B] ints, K per round, accepted <= drafted."""
    drafted, accepted = np.asarray(out.num_drafted), np.asarray(out.num_accepted)
    batch = out.tokens.shape[0]
    assert drafted.shape == accepted.shape == (batch,)
    assert np.all(drafted % k == 0)
    assert np.all((accepted >= 0) & (accepted <= drafted))
    assert np.all(drafted <= k * (max_new_tokens - 1))  # every round emits at least one token
    return drafted, accepted


# ---------------------------------------------------------------------------------------
# Lossless: the first three new tokens follow the target's processed distribution exactly.

CONFIGS = {
    "temperature_1": SamplingConfig(temperature=1.0),
    "temperature_0.7_top_k_top_p": SamplingConfig(temperature=0.7, top_k=5, top_p=0.8),
    "repetition_penalty_1.3": SamplingConfig(repetition_penalty=1.3),
}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lossless_joint_of_first_three_tokens(target, draft, name, k):
    config = CONFIGS[name]
    out = speculative_generate(target, draft, big_prompt(), key=jax.random.key(100 + k), config=config,
                               max_new_tokens=3, num_speculative_tokens=k)
    pvalue = chisquare_pvalue(np.asarray(out.tokens), markov_joint(target.table, PROMPT, 3, config))
    drafted, accepted = check_counts(out, k, 3)
    rate = accepted.sum() / drafted.sum()
    print(f"speculative {name} K={k}: chi-square p = {pvalue:.4g}, acceptance {rate:.2f}")
    assert pvalue > P_MIN, pvalue
    assert 0.05 < rate < 0.95  # drafts are both accepted and rejected


def test_lossless_with_an_unrelated_draft(target):
    """A draft with an independent random table: mostly rejected, still exact."""
    config = SamplingConfig(temperature=1.0)
    unrelated = random_markov_model(VOCAB, seed=1)
    out = speculative_generate(target, unrelated, big_prompt(), key=jax.random.key(7), config=config,
                               max_new_tokens=3, num_speculative_tokens=2)
    pvalue = chisquare_pvalue(np.asarray(out.tokens), markov_joint(target.table, PROMPT, 3, config))
    print(f"speculative unrelated draft K=2: chi-square p = {pvalue:.4g}")
    assert pvalue > P_MIN, pvalue


# ---------------------------------------------------------------------------------------
# The small ragged batch: 64 right-padded rows, 101 new tokens (not a multiple of K+1).

RAGGED = [[4, 2, 6, 1, 3], [5, 0], [7, 7, 2, 4], [6], [2, 2, 2], [0, 1, 2, 3, 4], [3], [1, 6]]
SMALL_ROWS = 64
SMALL_NEW_TOKENS = 101  # prime: no multiple of K+1


def small_batch():
    rows = [RAGGED[b % len(RAGGED)] for b in range(SMALL_ROWS)]
    prompt = np.full((SMALL_ROWS, 5), 1, np.int32)  # padding: a real token id, on purpose
    for b, row in enumerate(rows):
        prompt[b, : len(row)] = row
    return rows, jnp.asarray(prompt), jnp.asarray([len(r) for r in rows], jnp.int32)


def run_small(target, draft, k, config, key=0, **kwargs):
    _, prompt, lengths = small_batch()
    return speculative_generate(target, draft, prompt, key=jax.random.key(key), config=config,
                                max_new_tokens=SMALL_NEW_TOKENS, num_speculative_tokens=k,
                                prompt_lengths=lengths, **kwargs)


def run_generate(model, config, **kwargs):
    _, prompt, lengths = small_batch()
    return generate(model, prompt, key=jax.random.key(0), config=config, max_new_tokens=SMALL_NEW_TOKENS,
                    prompt_lengths=lengths, **kwargs)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.6),
        dict(do_sample=False, repetition_penalty=1.6, eos=3),  # some rows stop early, others not
    ],
)
def test_greedy_identical_to_generate(target, draft, k, params):
    params = dict(params)
    eos = params.pop("eos", None)
    config = SamplingConfig(**params)
    out = run_small(target, draft, k, config, eos_token_id=eos)
    reference = run_generate(target, config, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(reference.lengths))
    check_counts(out, k, SMALL_NEW_TOKENS)
    if eos is None:
        rows, _, _ = small_batch()
        penalty = params.get("repetition_penalty", 1.0)
        for b in range(len(RAGGED)):
            chain = greedy_chain(target.table, rows[b], SMALL_NEW_TOKENS, penalty)
            np.testing.assert_array_equal(np.asarray(out.tokens[b]), chain, err_msg=f"row {b}")
    else:
        stopped = check_eos_rows(out.tokens, out.lengths, eos, 0)
        assert 0 < stopped < SMALL_ROWS


@pytest.mark.parametrize("k", KS)
def test_draft_equal_to_target_accepts_everything(target, k):
    config = SamplingConfig(temperature=1.0, top_k=6, repetition_penalty=1.2)
    out = run_small(target, target, k, config, key=k)
    drafted, accepted = check_counts(out, k, SMALL_NEW_TOKENS)
    rounds = -(-(SMALL_NEW_TOKENS - 1) // (k + 1))  # the first token comes from the prefill
    np.testing.assert_array_equal(drafted, k * rounds)
    np.testing.assert_array_equal(accepted, drafted)
    assert accepted.sum() / drafted.sum() == 1.0
    np.testing.assert_array_equal(np.asarray(out.lengths), SMALL_NEW_TOKENS)


@pytest.mark.parametrize("k", KS)
def test_eos_stops_rows_individually(target, draft, k):
    eos, pad = 2, -1  # pad -1 is no token id: every real output position is visible
    out = run_small(target, draft, k, SamplingConfig(temperature=1.5), key=10 + k, eos_token_id=eos,
                    pad_token_id=pad)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (SMALL_ROWS, SMALL_NEW_TOKENS)
    stopped = check_eos_rows(tokens, out.lengths, eos, pad)
    lengths = np.asarray(out.lengths)
    assert stopped > SMALL_ROWS // 2 and len(set(lengths.tolist())) > 10  # rows stop at their own steps
    assert np.all(tokens[np.arange(SMALL_NEW_TOKENS) < lengths[:, None]] >= 0)  # exactly `lengths` tokens
    drafted, _ = check_counts(out, k, SMALL_NEW_TOKENS)
    # A row that stopped early drafted no more than the rounds its tokens needed.
    assert np.all(drafted <= k * (lengths - 1))
    assert np.all(drafted[lengths == 1] == 0)


def test_compiled_once_across_configs(target, draft):
    configs = [
        SamplingConfig(temperature=1.0, top_k=0, top_p=1.0),
        SamplingConfig(temperature=0.7, top_k=5, top_p=0.9),
        SamplingConfig(temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=1.3),
        SamplingConfig(temperature=1.4, top_k=2, top_p=0.95, min_p=0.1),
        SamplingConfig(temperature=2.0, top_k=7, top_p=0.97),
    ]
    outputs = []
    for i, config in enumerate(configs):
        outputs.append(np.asarray(run_small(target, draft, 4, config, key=i).tokens))
        if i == 0:
            size = speculative_module.speculative_loop._cache_size()
    assert speculative_module.speculative_loop._cache_size() == size
    assert len({o.tobytes() for o in outputs}) == len(configs)
    run_small(random_markov_model(VOCAB, seed=5), draft, 4, configs[1])  # new weights: traced
    assert speculative_module.speculative_loop._cache_size() == size


# ---------------------------------------------------------------------------------------
# Bad input and the guide's facade.


def test_bad_input(target, draft):
    prompt = jnp.asarray(PROMPT[None])
    kwargs = dict(key=jax.random.key(0), config=SamplingConfig())
    kwargs_k = dict(num_speculative_tokens=2, **kwargs)
    for k in (0, -1):
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            speculative_generate(target, draft, prompt, num_speculative_tokens=k, max_new_tokens=4, **kwargs)
        with pytest.raises(ValueError, match="num_speculative_tokens"):
            SpeculativeDecoder(target_model=target, draft_model=draft, num_speculative_tokens=k)
    for k in (2.0, "2", True, None):
        with pytest.raises(TypeError, match="num_speculative_tokens"):
            speculative_generate(target, draft, prompt, num_speculative_tokens=k, max_new_tokens=4, **kwargs)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, random_markov_model(VOCAB + 1), prompt, max_new_tokens=4, **kwargs_k)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, prompt, max_new_tokens=0, **kwargs_k)
    with pytest.raises(ValueError, match="prompt_lengths"):
        speculative_generate(target, draft, prompt, max_new_tokens=4, prompt_lengths=[4], **kwargs_k)


def test_guide_facade(target, draft):
    _, input_ids, _ = small_batch()  # full-length rows this time (no prompt_lengths)
    speculative = SpeculativeDecoder(target_model=target, draft_model=draft, num_speculative_tokens=4)
    output = speculative.generate(input_ids, max_new_tokens=100)
    assert isinstance(output, GenerationOutput)
    assert output.tokens.shape == (SMALL_ROWS, 100)
    np.testing.assert_array_equal(np.asarray(output.lengths), 100)
    drafted, accepted = check_counts(output, 4, 100)
    assert 0 < accepted.sum() < drafted.sum()
    again = speculative.generate(input_ids, max_new_tokens=100)  # the facade advances its key
    assert not np.array_equal(np.asarray(again.tokens), np.asarray(output.tokens))
    greedy = SpeculativeDecoder(target_model=target, draft_model=draft, num_speculative_tokens=4,
                                config=SamplingConfig(temperature=0.0))
    greedy = np.asarray(greedy.generate(input_ids, max_new_tokens=100).tokens)
    for b in range(len(RAGGED)):
        np.testing.assert_array_equal(greedy[b], greedy_chain(target.table, input_ids[b], 100))
