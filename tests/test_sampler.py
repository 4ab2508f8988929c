"""`sample()` and `TokenSampler`: properties, jit/vmap, compiled once, per-row seeds, edge cases.

Compiling `sample` costs seconds on these CPUs, so most tests share a few programs: logits
`[BATCH, VOCAB]` and configs whose every numeric field is a `[BATCH]` array (`rows(...)`),
with or without a `[BATCH, HISTORY]` history.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sampling_reference import reference_process

from rtdlm.sampling import (
    DEFAULT_PROCESSORS,
    SamplingConfig,
    SamplingResult,
    TokenSampler,
    create_sampling_config_balanced,
    draw,
    init_from_history,
    row_keys,
    sample,
)

sample_jit = jax.jit(sample)
BATCH = 4
VOCAB = 64
HISTORY = 8
NO_HISTORY = None


def rows(**params) -> SamplingConfig:
    """A config with every numeric field as a [BATCH] array (one shared tree structure)."""
    config = SamplingConfig(**params)
    return jax.tree.map(lambda leaf: np.broadcast_to(np.asarray(leaf), (BATCH,)).copy(), config)


def padded(logit_rows, width=VOCAB) -> jnp.ndarray:
    """Hand-made rows padded with -inf to [BATCH, width] (missing rows repeat the last)."""
    out = np.full((BATCH, width), -np.inf, np.float32)
    for b in range(BATCH):
        row = logit_rows[min(b, len(logit_rows) - 1)]
        out[b, : len(row)] = row
    return jnp.asarray(out)


def random_logits(seed, shape=(BATCH, VOCAB), scale=1.5):
    return jnp.asarray((np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32))


def random_params(rng: np.random.Generator, vocab: int) -> dict:
    """Random per-row settings for the property tests."""
    return dict(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7], size=BATCH).astype(np.float32),
        top_k=np.where(rng.random(BATCH) < 0.5, rng.integers(1, vocab + 2, BATCH), 0).astype(np.int32),
        top_p=np.where(rng.random(BATCH) < 0.6, rng.uniform(0.05, 1, BATCH), 1).astype(np.float32),
        min_p=np.where(rng.random(BATCH) < 0.3, rng.uniform(0, 0.3, BATCH), 0).astype(np.float32),
        typical_p=np.where(rng.random(BATCH) < 0.3, rng.uniform(0.2, 1, BATCH), 1).astype(np.float32),
        repetition_penalty=rng.uniform(0.8, 1.8, BATCH).astype(np.float32),
        do_sample=rng.random(BATCH) < 0.85,
    )


def assert_result_is_consistent(result: SamplingResult, *, atol: float = 1e-5) -> None:
    """The SamplingResult invariants, for [B] results."""
    for leaf in jax.tree.leaves(result):
        assert not np.isnan(np.asarray(leaf, np.float64)).any()
    token = np.asarray(result.token_id)
    probs = np.asarray(result.all_probabilities, np.float64)
    index = np.arange(probs.shape[0])
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=atol)
    assert (probs >= 0).all()
    assert (probs[index, token] > 0).all(), "the drawn token must be kept"
    np.testing.assert_allclose(result.probability, probs[index, token], rtol=1e-6)
    probability = np.asarray(result.probability, np.float64)
    logprob = np.asarray(result.logprob, np.float64)
    assert (logprob <= 1e-6).all()
    np.testing.assert_allclose(logprob, np.log(probability), atol=1e-5, rtol=1e-5)
    top_ids, top_probs = np.asarray(result.top_token_ids), np.asarray(result.top_probabilities)
    assert (np.diff(top_probs, axis=-1) <= 0).all(), "top_probabilities must be descending"
    np.testing.assert_array_equal(top_probs, probs[index[:, None], top_ids].astype(np.float32))
    n = top_ids.shape[-1]
    np.testing.assert_allclose(top_probs, -np.sort(-probs, axis=-1)[:, :n], rtol=1e-6, atol=1e-12)
    for ids in top_ids:
        assert len(set(ids.tolist())) == n


# ---- properties ------------------------------------------------------------------------------
@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.sampled_from([7, VOCAB, 300]),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    key_seed=st.integers(0, 2**31 - 1),
)
def test_sample_properties(seed, vocab, scale, key_seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(BATCH, vocab)) * scale).astype(np.float32)
    history = rng.integers(-1, vocab, size=(BATCH, HISTORY)).astype(np.int32)
    params = random_params(rng, vocab)
    result = sample_jit(jax.random.key(key_seed), jnp.asarray(logits), rows(**params), jnp.asarray(history))
    assert result.token_id.shape == (BATCH,) and result.token_id.dtype == jnp.int32
    assert result.all_probabilities.shape == (BATCH, vocab)
    assert result.top_token_ids.shape == (BATCH, min(10, vocab))
    assert_result_is_consistent(result)
    ref = reference_process(logits, token_history=history, **params)
    token = np.asarray(result.token_id)
    for b in range(BATCH):
        if ref.margin[b] < 1e-5:
            continue  # a decision within float32 rounding of its boundary
        assert np.isfinite(ref.logits[b, token[b]]), "drawn token outside the reference kept set"
        np.testing.assert_allclose(result.all_probabilities[b], ref.probabilities[b], atol=1e-5)
        if ref.greedy[b]:
            assert token[b] == np.flatnonzero(np.isfinite(ref.logits[b]))[0]
            assert float(result.probability[b]) == 1.0
            assert float(result.logprob[b]) == 0.0


def test_greedy_returns_first_argmax_with_probability_one():
    logits = padded([[0.5, 2.0, 2.0, -1.0], [3.0, -np.inf, 3.0, 1.0]])
    for config in (
        rows(temperature=0.0),
        rows(do_sample=False, temperature=0.9),
        rows(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2),
    ):
        result = sample_jit(jax.random.key(3), logits, config)
        np.testing.assert_array_equal(result.token_id, [1, 0, 0, 0])
        np.testing.assert_array_equal(result.probability, 1.0)
        np.testing.assert_array_equal(result.logprob, 0.0)
        expected = np.zeros((BATCH, VOCAB))
        expected[np.arange(BATCH), [1, 0, 0, 0]] = 1.0
        np.testing.assert_array_equal(result.all_probabilities, expected)


def test_greedy_uses_the_penalised_logits():
    logits = padded([[3.0, 2.5, -1.0]])
    history = jnp.full((BATCH, HISTORY), -1, jnp.int32).at[:, 0].set(0)
    result = sample_jit(jax.random.key(0), logits, rows(temperature=0.0, repetition_penalty=1.5), history)
    np.testing.assert_array_equal(result.token_id, 1)  # 3.0 / 1.5 = 2.0 < 2.5


def test_unbatched_logits_give_unbatched_results():
    logits = random_logits(0, (VOCAB,))
    result = sample_jit(jax.random.key(0), logits, SamplingConfig(top_k=5))
    assert result.token_id.shape == ()
    assert result.all_probabilities.shape == (VOCAB,)
    assert result.top_token_ids.shape == (10,)
    assert_result_is_consistent(jax.tree.map(lambda x: x[None], result))
    np.testing.assert_array_equal(
        np.sort(np.asarray(result.top_token_ids)[:5]), np.sort(np.argsort(-np.asarray(logits))[:5])
    )
    np.testing.assert_array_equal(result.top_probabilities[5:], 0.0)  # only 5 kept


def test_num_top_tokens_larger_than_vocab():
    history = jnp.full((BATCH, HISTORY), -1, jnp.int32)
    result = sample_jit(jax.random.key(0), jnp.zeros((BATCH, 7)), rows(), history)
    assert result.top_token_ids.shape == (BATCH, 7)
    np.testing.assert_allclose(result.top_probabilities, 1 / 7, rtol=1e-6)


def test_state_and_token_history_agree():
    logits = random_logits(4)
    history = jnp.asarray(np.random.default_rng(4).integers(-1, VOCAB, (BATCH, HISTORY)).astype(np.int32))
    config = rows(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.1, top_k=10)
    state = init_from_history(DEFAULT_PROCESSORS, history, VOCAB, config)
    a = sample_jit(jax.random.key(1), logits, config, history)
    b = jax.jit(lambda k, x, c, s: sample(k, x, c, state=s))(jax.random.key(1), logits, config, state)
    chex.assert_trees_all_close(a, b)


def test_sample_validates_inputs():
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="float"):
        sample(key, jnp.zeros((2, 5), jnp.int32), SamplingConfig())
    with pytest.raises(ValueError, match="shape"):
        sample(key, jnp.zeros((2, 3, 5)), SamplingConfig())
    with pytest.raises(TypeError, match="SamplingConfig"):
        sample(key, jnp.zeros((2, 5)), {"temperature": 0.5})


# ---- jit: compiled once; vmap ----------------------------------------------------------------
def test_one_compiled_function_serves_every_config():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, logits, config):
        return sample(key, logits, config)

    logits = random_logits(0)
    configs = [
        SamplingConfig(
            temperature=[0.7] * 4, top_k=[50] * 4, top_p=[0.9] * 4, min_p=[0.0] * 4, seed=[1, 2, 3, 4]
        ),
        SamplingConfig(
            temperature=[1.2, 0.3, 0.0, 1.0],
            top_k=[0, 5, 100, 1],
            top_p=[1.0, 0.5, 0.9, 0.1],
            min_p=[0.1, 0.0, 0.3, 0.0],
            seed=[9, 9, 9, 9],
        ),
        SamplingConfig(
            temperature=[2.0] * 4, top_k=[3] * 4, top_p=[0.95] * 4, min_p=[0.5] * 4, seed=[0, 1, 2, 2**32 - 1]
        ),
        SamplingConfig(
            temperature=[0.0] * 4, top_k=[0] * 4, top_p=[1.0] * 4, min_p=[0.0] * 4, seed=[5, 6, 7, 8]
        ),
        SamplingConfig(
            temperature=[0.5, 0.6, 0.7, 0.8],
            top_k=[7, 8, 9, 10],
            top_p=[0.2, 0.4, 0.6, 0.8],
            min_p=[0.01, 0.02, 0.03, 0.04],
            seed=[10, 20, 30, 40],
        ),
    ]
    for i, config in enumerate(configs):
        assert_result_is_consistent(step(jax.random.key(i), logits, config))


def test_token_sampler_compiles_once_for_new_values():
    sampler = TokenSampler(seed=0)
    logits = np.asarray(random_logits(1))
    traced = []

    @jax.jit
    def probe(config):  # the same tree-structure/shape check the facade's jit relies on
        traced.append(1)
        return config.temperature

    for t, k, p in [(0.7, 50, 0.9), (1.2, 100, 0.95), (0.3, 20, 0.9), (0.0, 0, 1.0)]:
        config = SamplingConfig(temperature=t, top_k=k, top_p=p)
        probe(config)
        assert_result_is_consistent(sampler.sample(logits, config))
    assert len(traced) == 1


def test_vmap_over_keys_matches_separate_calls():
    logits = random_logits(2)
    config = rows(temperature=0.8, top_k=40, top_p=0.9)
    keys = jax.random.split(jax.random.key(7), 6)
    batched = jax.jit(jax.vmap(lambda k: sample(k, logits, config)))(keys)
    assert batched.token_id.shape == (6, BATCH)
    for i in range(6):
        single = sample_jit(keys[i], logits, config)
        np.testing.assert_array_equal(batched.token_id[i], single.token_id)
        np.testing.assert_allclose(batched.all_probabilities[i], single.all_probabilities, rtol=1e-6)


def test_vmap_over_rows_of_unbatched_logits():
    logits = random_logits(3)
    history = np.random.default_rng(3).integers(-1, VOCAB, size=(BATCH, HISTORY))
    history = jnp.asarray(history, jnp.int32)
    config = SamplingConfig(top_k=5)
    keys = jax.random.split(jax.random.key(8), BATCH)
    # [V] logits inside vmap
    per_row = jax.jit(jax.vmap(lambda k, x: sample(k, x, config)))(keys, logits)
    assert per_row.token_id.shape == (BATCH,)
    for b in range(BATCH):
        single = sample_jit(keys[b], logits[b], config)
        assert int(per_row.token_id[b]) == int(single.token_id)
        np.testing.assert_allclose(per_row.all_probabilities[b], single.all_probabilities, rtol=1e-6)
    # per-row configs as a vmapped PyTree give the batched call's distributions
    configs = rows(
        temperature=[0.5, 1.0, 1.5, 0.0],
        top_k=[0, 3, 10, 0],
        top_p=[1.0, 0.9, 0.5, 1.0],
        repetition_penalty=[1.0, 1.1, 1.5, 2.0],
    )
    vmapped = jax.jit(jax.vmap(lambda k, x, h, c: sample(k, x[None], c, h[None]).all_probabilities[0]))(
        keys, logits, history, configs
    )
    batched = sample_jit(jax.random.key(0), logits, configs, history).all_probabilities
    np.testing.assert_allclose(vmapped, batched, rtol=1e-6, atol=1e-7)


# ---- per-row seeds ---------------------------------------------------------------------------
def test_per_row_seed_makes_a_row_independent_of_the_batch():
    logits = np.asarray(random_logits(5))
    seeds = np.array([11, 22, 33, 44], np.uint32)
    temperature = np.array([0.7, 1.0, 1.3, 0.9], np.float32)
    top_p = np.array([0.9, 1.0, 0.8, 0.95], np.float32)
    key = jax.random.key(123)
    batch = sample_jit(key, jnp.asarray(logits), rows(temperature=temperature, top_p=top_p, seed=seeds))
    for b in range(BATCH):
        # the same row (logits, settings, seed) in another batch, at another position
        position = (b + 1) % BATCH
        mixed_logits = np.array(random_logits(50 + b))
        mixed_logits[position] = logits[b]
        mixed_seeds = np.array([7, 8, 9, 10], np.uint32)
        mixed_seeds[position] = seeds[b]
        t, p = np.full(BATCH, 1.0, np.float32), np.full(BATCH, 1.0, np.float32)
        t[position], p[position] = temperature[b], top_p[b]
        mixed = sample_jit(key, jnp.asarray(mixed_logits), rows(temperature=t, top_p=p, seed=mixed_seeds))
        assert int(mixed.token_id[position]) == int(batch.token_id[b])
        alone = sample_jit(
            key,
            jnp.asarray(logits[b : b + 1]),
            SamplingConfig(
                temperature=temperature[b : b + 1],
                top_p=top_p[b : b + 1],
                seed=seeds[b : b + 1],
                do_sample=[True],
            ),
        )
        assert int(alone.token_id[0]) == int(batch.token_id[b])
    # reordering the batch reorders the tokens
    order = np.array([2, 0, 3, 1])
    shuffled = sample_jit(
        key,
        jnp.asarray(logits[order]),
        rows(temperature=temperature[order], top_p=top_p[order], seed=seeds[order]),
    )
    np.testing.assert_array_equal(shuffled.token_id, np.asarray(batch.token_id)[order])


def test_row_keys():
    key = jax.random.key(0)
    same = jax.random.key_data(row_keys(key, SamplingConfig(seed=[7, 7, 8]), 3))
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], same[2])
    for config in (SamplingConfig(), SamplingConfig(seed=7)):
        split = jax.random.key_data(row_keys(key, config, 3))
        assert len({tuple(np.asarray(row).ravel()) for row in split}) == 3


def test_seeds_draw_reproducibly_and_differently():
    logits = jnp.zeros((BATCH, VOCAB), jnp.float32)  # uniform
    seeds = np.array([0, 1, 2, 3], np.uint32)
    keys = jax.random.split(jax.random.key(0), 50)
    draws = np.stack([np.asarray(sample_jit(k, logits, rows(seed=seeds)).token_id) for k in keys[:3]])
    again = np.asarray(sample_jit(keys[0], logits, rows(seed=seeds)).token_id)
    np.testing.assert_array_equal(draws[0], again)
    assert len({tuple(d) for d in draws}) == 3
    # different seeds in one batch: rows are not copies of each other
    many = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, rows(seed=seeds)).token_id))(keys))
    assert (many[:, 0] != many[:, 1]).mean() > 0.9


def test_scalar_seed_rows_are_independent():
    logits = jnp.zeros((BATCH, VOCAB), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 50)
    config = SamplingConfig(seed=42)
    many = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, config).token_id))(keys))
    for b in range(1, BATCH):  # identical rows with one seed still draw independently
        assert (many[:, 0] != many[:, b]).mean() > 0.9


# ---- degenerate inputs inside jit ------------------------------------------------------------
def test_degenerate_rows_inside_jit():
    logits = jnp.array(
        [
            [-np.inf] * 6,
            [np.nan] * 6,
            [1.0, np.nan, 2.0, np.nan, 0.5, -np.inf],
            [1.0, np.inf, 2.0, np.inf, 0.5, -1.0],
        ],
        jnp.float32,
    )
    result = sample_jit(jax.random.key(0), logits, rows(temperature=0.8, top_k=3))
    assert_result_is_consistent(result)
    probs = np.asarray(result.all_probabilities)
    np.testing.assert_allclose(probs[0], 1 / 6, rtol=1e-6)  # nothing finite: uniform
    np.testing.assert_allclose(probs[1], 1 / 6, rtol=1e-6)
    assert probs[2, 1] == probs[2, 3] == probs[2, 5] == 0.0  # NaN and -inf removed
    np.testing.assert_allclose(probs[3], [0, 0.5, 0, 0.5, 0, 0], atol=1e-7)  # +inf share the mass
    assert int(result.token_id[3]) in (1, 3)
    greedy = sample_jit(jax.random.key(0), logits, rows(temperature=0.0))
    assert_result_is_consistent(greedy)
    np.testing.assert_array_equal(greedy.token_id, [0, 0, 2, 1])
    # many draws never pick a removed token
    keys = jax.random.split(jax.random.key(1), 2000)
    config = rows(temperature=0.8, top_k=0)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, config).token_id))(keys))
    assert not np.isin(tokens[:, 2], [1, 3, 5]).any()
    assert np.isin(tokens[:, 3], [1, 3]).all()
    assert len(set(tokens[:, 0].tolist())) == 6


def test_everything_banned_is_uniform_not_nan():
    config = SamplingConfig(banned_token_ids=list(range(VOCAB)))
    result = sample_jit(jax.random.key(0), random_logits(6), config)
    assert_result_is_consistent(result)
    np.testing.assert_allclose(result.all_probabilities, 1 / VOCAB, rtol=1e-6)


def test_traced_greedy_and_clamped_values():
    logits = random_logits(6)

    @jax.jit
    def with_temperature(key, temperature):
        return sample(key, logits, SamplingConfig(temperature=temperature))

    for t in (0.0, -1.0, np.nan):  # traced values are not validated: <= 0 or NaN is greedy
        result = with_temperature(jax.random.key(0), jnp.float32(t))
        np.testing.assert_array_equal(result.token_id, np.argmax(np.asarray(logits), axis=-1))


def test_bfloat16_logits():
    logits16 = random_logits(7).astype(jnp.bfloat16)
    config = rows(temperature=0.7, top_k=50, top_p=0.9)
    result = sample_jit(jax.random.key(0), logits16, config)
    assert_result_is_consistent(result)
    assert result.all_probabilities.dtype == jnp.float32
    same = sample_jit(jax.random.key(0), logits16.astype(jnp.float32), config)
    np.testing.assert_array_equal(result.token_id, same.token_id)
    greedy = sample_jit(jax.random.key(0), logits16, rows(temperature=0.0))
    np.testing.assert_array_equal(greedy.token_id, np.argmax(np.asarray(logits16, np.float32), axis=-1))


def test_draw_never_returns_a_zero_weight_token():
    weights = np.zeros((3, 700), np.float32)
    weights[0, 699] = 1e-30  # a tiny last token: rounding must not push the draw past it
    weights[1, 0] = 1.0
    weights[2, [255, 256]] = 1.0  # across the 256-block boundary
    weights = jnp.asarray(weights)
    keys = jax.random.split(jax.random.key(0), 500)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: draw(jax.random.split(k, 3), weights)))(keys))
    assert (tokens[:, 0] == 699).all() and (tokens[:, 1] == 0).all()
    assert set(tokens[:, 2].tolist()) == {255, 256}


# ---- the facade ------------------------------------------------------------------------------
def test_token_sampler_guide_usage():
    logits = np.asarray(random_logits(8, (1000,), 2.0))
    sampler = TokenSampler()
    config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)
    result = sampler.sample(logits, config, token_history=[])
    assert 0 <= int(result.token_id) < 1000
    assert 0 < float(result.probability) <= 1
    assert result.all_probabilities.shape == (1000,)
    assert int(result.token_id) in np.argsort(-logits)[:50]


def test_token_sampler_is_reproducible_and_advances():
    logits = np.zeros((BATCH, VOCAB), np.float32)  # uniform: 64^4 equally likely outcomes per call
    for config, make in [
        (SamplingConfig(seed=[42, 43, 44, 45]), TokenSampler),
        (SamplingConfig(), lambda: TokenSampler(seed=42)),
    ]:
        first = [tuple(np.asarray(make().sample(logits, config).token_id)) for _ in range(2)]
        assert first[0] == first[1]  # a new sampler replays the sequence
        sampler = make()
        draws = [tuple(np.asarray(sampler.sample(logits, config).token_id)) for _ in range(4)]
        assert draws[0] == first[0]
        assert len(set(draws)) == 4  # consecutive calls draw fresh tokens


def test_token_sampler_rejects_bad_logits():
    sampler = TokenSampler()
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan], np.float32), SamplingConfig())
    with pytest.raises(TypeError, match="float"):
        sampler.sample(np.array([1, 2, 3]), SamplingConfig())


def test_token_sampler_with_history():
    logits = np.asarray(padded([[5.0, 4.9, 0.0]]))
    sampler = TokenSampler()
    config = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    result = sampler.sample(logits, config, token_history=[[0, -1], [-1, -1], [-1, -1], [0, 0]])
    np.testing.assert_array_equal(result.token_id, [1, 0, 0, 1])
    # the guide's form: [V] logits, a plain list of previous tokens
    result = sampler.sample(logits[0], config, token_history=[0, 2])
    assert int(result.token_id) == 1


def test_preset_through_the_facade():
    logits = np.asarray(random_logits(9, scale=3.0))
    result = TokenSampler().sample(
        logits, create_sampling_config_balanced(), token_history=[[1, 2], [3, -1], [-1, -1], [5, 5]]
    )
    assert_result_is_consistent(result)
    assert (np.count_nonzero(np.asarray(result.all_probabilities), axis=-1) <= 50).all()


# ---- strict rank promotion -------------------------------------------------------------------
def test_sampling_runs_under_strict_rank_promotion():
    history = jnp.full((2, 3), -1, jnp.int32)
    config = SamplingConfig(
        temperature=[0.0, 1.0],
        top_k=3,
        top_p=0.9,
        min_p=0.1,
        typical_p=0.9,
        repetition_penalty=1.2,
        min_new_tokens=1,
        eos_token_id=2,
        logit_bias={1: 1.0},
        banned_token_ids=[3],
    )
    with jax.numpy_rank_promotion("raise"):
        out = jax.jit(lambda k, x, c, h: sample(k, x, c, h).token_id)(
            jax.random.key(0), jnp.zeros((2, 16)), config, history
        )
    assert out.shape == (2,)


# ---- the facade in the guide's loop (issue 12) -----------------------------------------------
def test_token_sampler_compiles_once_per_history_bucket_in_the_guides_loop(monkeypatch):
    # sample, append the token, sample again: histories of length 0..99 fall in the buckets
    # 64 and 128, so the facade's program is traced twice, not once per length.
    chex.clear_trace_counter()
    counted = chex.assert_max_traces(TokenSampler._step.__wrapped__, n=2)
    monkeypatch.setattr(TokenSampler, "_step", staticmethod(jax.jit(counted)))
    sampler = TokenSampler(seed=0)
    config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3)
    rng = np.random.default_rng(0)
    history: list[int] = []
    for _ in range(100):
        logits = (rng.normal(size=VOCAB) * 2.0).astype(np.float32)
        result = sampler.sample(logits, config, token_history=history)
        history.append(int(result.token_id))
    assert len(history) == 100


def test_token_sampler_padded_history_matches_sample():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(BATCH, VOCAB)) * 2.0).astype(np.float32)
    config = SamplingConfig(temperature=0.8, top_k=20, repetition_penalty=1.5, presence_penalty=0.7)
    for length in (0, 3, 64, 65):
        history = rng.integers(0, VOCAB, size=(BATCH, length))
        sampler = TokenSampler(seed=5)
        got = sampler.sample(logits, config, token_history=history)
        bucket = 64 if length <= 64 else 128
        assert TokenSampler._bucketed_history(history, logits.shape).shape == (BATCH, bucket)
        key = jax.random.split(jax.random.key(5))[1]  # the facade's first draw key
        want = sample(key, logits, config, history if length else None)
        np.testing.assert_array_equal(got.token_id, want.token_id)
        np.testing.assert_allclose(got.all_probabilities, want.all_probabilities, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("history", [[1.5, 2.0], [2**40], ["a"]])
def test_token_sampler_rejects_bad_history(history):
    with pytest.raises((TypeError, ValueError), match="token_history"):
        TokenSampler().sample(np.zeros(VOCAB, np.float32), SamplingConfig(), token_history=history)


def test_token_sampler_nan_check_keeps_the_key():
    sampler, fresh = TokenSampler(seed=3), TokenSampler(seed=3)
    logits = np.zeros(VOCAB, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(np.full(VOCAB, np.nan, np.float32), SamplingConfig())
    # the failed call drew nothing: the sequence continues as for a fresh sampler
    assert int(sampler.sample(logits).token_id) == int(fresh.sample(logits).token_id)
