"""Tests of `rtdlm.decoding.generate`: exact distributions, greedy, ragged prompts, EOS, jit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from markov_reference import (
    check_eos_rows,
    chisquare_pvalue,
    greedy_chain,
    markov_joint,
    process_distribution,
)

from rtdlm.decoding import GenerationOutput, LinenModel, generate
from rtdlm.decoding import loop as loop_module
from rtdlm.decoding.testing import MarkovModel, WideCacheModel, random_markov_model
from rtdlm.sampling import SamplingConfig, probabilities, process_logits, token_counts

VOCAB = 8
PROMPT = np.array([3, 1, 5], np.int32)
NUM_ROWS = 40_000
P_MIN = 1e-4


@pytest.fixture(scope="module")
def model():
    return random_markov_model(VOCAB, seed=0)


def tiled(prompt, rows):
    return jnp.asarray(np.tile(np.asarray(prompt, np.int32), (rows, 1)))


# ---------------------------------------------------------------------------------------
# The reference itself, against the library's processing chain on random logits.


@jax.jit
def processed_probabilities(logits, config, history):
    return probabilities(process_logits(logits, config, history))


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=4, top_p=0.8),
        dict(temperature=1.3, top_p=0.6, min_p=0.05),
        dict(repetition_penalty=1.3, top_k=3),
        dict(temperature=0.0, repetition_penalty=2.0),
    ],
)
def test_reference_matches_process_logits(params):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(256, VOCAB)).astype(np.float32) * 2
    history = rng.integers(-1, VOCAB, size=(256, 4)).astype(np.int32)
    counts = token_counts(jnp.asarray(history), VOCAB)
    config = SamplingConfig(**params)
    got = processed_probabilities(jnp.asarray(logits), config, jnp.asarray(history))
    want = process_distribution(logits, np.asarray(counts) > 0, **params)
    np.testing.assert_array_equal(np.asarray(got) > 0, want > 0)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


# ---------------------------------------------------------------------------------------
# Exact distributions.


DISTRIBUTION_CONFIGS = {
    "temperature_1": SamplingConfig(temperature=1.0),
    "temperature_0.7_top_k_top_p": SamplingConfig(temperature=0.7, top_k=5, top_p=0.8),
    "repetition_penalty_1.3": SamplingConfig(repetition_penalty=1.3),
    "min_p_eos_min_new_tokens": SamplingConfig(temperature=1.2, min_p=0.05, eos_token_id=2, min_new_tokens=1),
}


@pytest.mark.parametrize("name", list(DISTRIBUTION_CONFIGS))
def test_joint_distribution_of_first_three_tokens(model, name):
    config = DISTRIBUTION_CONFIGS[name]
    out = generate(model, tiled(PROMPT, NUM_ROWS), key=jax.random.key(7), config=config, max_new_tokens=3)
    joint = markov_joint(model.table, PROMPT, 3, config)
    pvalue = chisquare_pvalue(np.asarray(out.tokens), joint)
    print(f"generate {name}: chi-square p = {pvalue:.4g}")
    assert pvalue > P_MIN, pvalue


def test_mixed_per_row_configs(model):
    """Rows with different temperatures / top-k in one batch; the temperature-0 rows are greedy."""
    groups = 3
    rows = groups * 14_000
    temperature = np.tile(np.array([0.0, 0.5, 1.5], np.float32), rows // groups)
    top_k = np.tile(np.array([0, 3, 0], np.int32), rows // groups)
    config = SamplingConfig(temperature=temperature, top_k=top_k)
    out = generate(model, tiled(PROMPT, rows), key=jax.random.key(3), config=config, max_new_tokens=3)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[0::3], np.tile(greedy_chain(model.table, PROMPT, 3), (rows // 3, 1)))
    for group, params in ((1, dict(temperature=0.5, top_k=3)), (2, dict(temperature=1.5))):
        pvalue = chisquare_pvalue(tokens[group::3], markov_joint(model.table, PROMPT, 3, **params))
        print(f"generate per-row group {params}: chi-square p = {pvalue:.4g}")
        assert pvalue > P_MIN, (params, pvalue)


# ---------------------------------------------------------------------------------------
# Greedy and ragged prompts. Small tests share one compiled shape: the ragged batch below,
# 12 new tokens, and per-row seeds in every config.


RAGGED = [[4, 2, 6, 1, 3], [5, 0], [7, 7, 2, 4], [6]]
SEEDS = [11, 22, 33, 44]
SMALL_NEW_TOKENS = 12


def padded(rows, width, pad_value):
    prompt = np.full((len(rows), width), pad_value, np.int32)
    for b, row in enumerate(rows):
        prompt[b, : len(row)] = row
    return jnp.asarray(prompt), jnp.asarray([len(r) for r in rows], jnp.int32)


def run_small(model, seeds=SEEDS, rows=RAGGED, pad_value=1, key=0, **config):
    """generate() on right-padded rows (`pad_value` is a real token id on purpose: counting
    padding as history would change the repetition penalty)."""
    prompt, lengths = padded(rows, max(map(len, RAGGED)), pad_value)
    config = SamplingConfig(seed=seeds, **config)
    return generate(
        model,
        prompt,
        key=jax.random.key(key),
        config=config,
        max_new_tokens=SMALL_NEW_TOKENS,
        prompt_lengths=lengths,
    )


@pytest.mark.parametrize(
    "params, penalty",
    [
        (dict(temperature=0.0), 1.0),
        (dict(do_sample=False, top_k=3, top_p=0.5), 1.0),
        (dict(temperature=0.0, repetition_penalty=2.5), 2.5),
    ],
)
def test_greedy_is_the_argmax_chain_on_ragged_prompts(model, params, penalty):
    out = run_small(model, **params)
    assert out.tokens.shape == (len(RAGGED), SMALL_NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out.lengths), SMALL_NEW_TOKENS)
    for b, row in enumerate(RAGGED):
        chain = greedy_chain(model.table, row, SMALL_NEW_TOKENS, penalty)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), chain, err_msg=f"row {b}")
        # The same row generated alone (batch of one, padded with another token).
        alone = run_small(model, seeds=[SEEDS[b]], rows=[row], pad_value=6, **params)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), chain, err_msg=f"row {b} alone")


def test_ragged_prompts_sampled_with_row_seeds_match_rows_alone(model):
    params = dict(temperature=1.3, repetition_penalty=2.0)
    out = np.asarray(run_small(model, key=5, **params).tokens)
    for b, row in enumerate(RAGGED):
        alone = run_small(model, seeds=[SEEDS[b]], rows=[row], pad_value=6, key=5, **params)
        np.testing.assert_array_equal(out[b], np.asarray(alone.tokens[0]), err_msg=f"row {b}")
    # Row keys depend on the seeds, not on the batch: a reordered batch gives reordered rows.
    order = [2, 0, 3, 1]
    shuffled = run_small(
        model, seeds=[SEEDS[i] for i in order], rows=[RAGGED[i] for i in order], key=5, **params
    )
    np.testing.assert_array_equal(np.asarray(shuffled.tokens), out[order])
    assert len({tuple(r) for r in out.tolist()}) == len(RAGGED)


# ---------------------------------------------------------------------------------------
# EOS, min_new_tokens, stop_when_done: a medium batch, 10 new tokens.


def run_medium(model, key=1, **kwargs):
    kwargs.setdefault("config", SamplingConfig(temperature=1.5))
    return generate(model, tiled(PROMPT, 2048), key=jax.random.key(key), max_new_tokens=10, **kwargs)


@pytest.mark.parametrize("pad_token_id", [0, 6])
def test_per_row_eos(model, pad_token_id):
    eos = 2
    out = run_medium(model, eos_token_id=eos, pad_token_id=pad_token_id)
    assert out.tokens.shape == (2048, 10) and out.lengths.shape == (2048,)
    stopped = check_eos_rows(out.tokens, out.lengths, eos, pad_token_id)
    assert 50 < stopped < 2000, stopped  # some rows stop, others run to the end
    assert len(set(np.asarray(out.lengths).tolist())) > 5  # and they stop at different steps
    # The EOS argument overrides the config's.
    out = run_medium(model, eos_token_id=eos, config=SamplingConfig(temperature=1.5, eos_token_id=4))
    check_eos_rows(out.tokens, out.lengths, eos, 0)
    assert np.any(np.asarray(out.tokens) == 4)


def test_min_new_tokens_masks_eos(model):
    eos = int(greedy_chain(model.table, PROMPT, 1)[0])  # the greedy first token *is* EOS ...
    out = run_medium(model, config=SamplingConfig(temperature=0.0), eos_token_id=eos)
    assert np.all(np.asarray(out.tokens[:, 0]) == eos) and np.all(np.asarray(out.lengths) == 1)
    # ... unless min_new_tokens masks it: then the runner-up comes first.
    out = run_medium(model, config=SamplingConfig(temperature=0.0, min_new_tokens=1), eos_token_id=eos)
    runner_up = int(np.argsort(-np.asarray(model.table[PROMPT[-1]]))[1])
    assert np.all(np.asarray(out.tokens[:, 0]) == runner_up)

    # Sampled: EOS never appears before min_new_tokens, and does after.
    out = run_medium(model, key=2, config=SamplingConfig(temperature=1.5, min_new_tokens=3, eos_token_id=eos))
    tokens = np.asarray(out.tokens)
    assert not np.any(tokens[:, :3] == eos)
    assert np.any(tokens[:, 3] == eos)
    check_eos_rows(tokens, out.lengths, eos, 0)
    assert np.all(np.asarray(out.lengths) >= 4)


def test_stop_when_done_equals_scan(model):
    config = SamplingConfig(temperature=1.5, repetition_penalty=1.2)
    eos = int(greedy_chain(model.table, PROMPT, 1)[0])
    scan = run_medium(model, config=config, eos_token_id=eos)
    early = run_medium(model, config=config, eos_token_id=eos, stop_when_done=True)
    np.testing.assert_array_equal(np.asarray(early.tokens), np.asarray(scan.tokens))
    np.testing.assert_array_equal(np.asarray(early.lengths), np.asarray(scan.lengths))
    assert 0 < np.sum(np.asarray(scan.lengths) < 10) < 2048
    # Also when every row stops before the end (the while loop exits early).
    config = SamplingConfig(temperature=0.0)
    scan = run_medium(model, config=config, eos_token_id=eos)
    early = run_medium(model, config=config, eos_token_id=eos, stop_when_done=True)
    np.testing.assert_array_equal(np.asarray(early.tokens), np.asarray(scan.tokens))
    np.testing.assert_array_equal(np.asarray(early.lengths), 1)


# ---------------------------------------------------------------------------------------
# Compilation, jaxpr, streaming.


def test_compiled_once_across_configs(model):
    configs = [
        dict(temperature=1.0, top_k=0, top_p=1.0),
        dict(temperature=0.7, top_k=5, top_p=0.9),
        dict(temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=1.3),
        dict(temperature=1.4, top_k=2, top_p=0.95, min_p=0.1),
        dict(temperature=2.0, top_k=7, top_p=0.97),
    ]
    outputs = []
    for i, params in enumerate(configs):
        outputs.append(np.asarray(run_small(model, seeds=[s + i for s in SEEDS], key=i, **params).tokens))
        if i == 0:
            size = loop_module._generate._cache_size()
    assert loop_module._generate._cache_size() == size
    assert len({o.tobytes() for o in outputs}) == len(configs)  # the values did reach the program
    # New model weights (traced arguments) do not recompile either.
    run_small(random_markov_model(VOCAB, seed=9))
    assert loop_module._generate._cache_size() == size


def test_decode_loop_holds_one_kv_cache(model):
    wide = WideCacheModel(model)
    config = SamplingConfig(temperature=0.8)

    def run(model, prompt):
        return generate(model, prompt, key=jax.random.key(0), config=config, max_new_tokens=40).tokens

    prompt = tiled(PROMPT, 8)
    jaxpr = str(jax.make_jaxpr(run)(wide, prompt))
    assert "scan" in jaxpr and "while" in jaxpr  # steps in chunks; no chunk once all are done
    # The chunk loop updates the cache in place: a cond that skips a chunk would keep a
    # second copy of it (measured: 2x the temporary memory).
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(wide.init_cache(8, 16 + 64)))
    compiled = jax.jit(run).lower(wide, prompt).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 1.25 * cache_bytes
    np.testing.assert_array_equal(np.asarray(run(wide, prompt)), np.asarray(run(model, prompt)))


def test_stream_gets_every_step_in_order(model):
    received = []

    def stream(step, tokens):
        received.append((int(step), np.array(tokens)))

    out = generate(
        model,
        tiled(PROMPT, 3),
        key=jax.random.key(8),
        config=SamplingConfig(temperature=1.2),
        max_new_tokens=7,
        stream=stream,
    )
    jax.effects_barrier()
    assert [step for step, _ in received] == list(range(7))
    np.testing.assert_array_equal(np.stack([t for _, t in received], axis=1), np.asarray(out.tokens))


# ---------------------------------------------------------------------------------------
# Bad input.


@struct.dataclass
class ShortMarkov(MarkovModel):
    """A Markov fake that declares a maximum context length."""

    max_length: int = struct.field(pytree_node=False, default=8)


def test_bad_input_raises(model):
    config = SamplingConfig()
    key = jax.random.key(0)
    short = ShortMarkov(model.table, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        generate(short, jnp.zeros((1, 10), jnp.int32), key=key, config=config, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_length"):
        generate(short, jnp.zeros((1, 5), jnp.int32), key=key, config=config, max_new_tokens=4)
    fits = jax.eval_shape(
        lambda: generate(short, jnp.zeros((1, 5), jnp.int32), key=key, config=config, max_new_tokens=3)
    )
    assert fits.tokens.shape == (1, 3)
    prompt = tiled(PROMPT, 2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, prompt, key=key, config=config, max_new_tokens=bad)
    for bad in ([3, 3, 3], [[3], [3]], [3]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            generate(model, prompt, key=key, config=config, max_new_tokens=2, prompt_lengths=bad)
    for bad in ([0, 3], [3, 4], [-1, 2]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            generate(model, prompt, key=key, config=config, max_new_tokens=2, prompt_lengths=bad)
    with pytest.raises(ValueError, match="rows"):
        generate(model, prompt, key=key, config=SamplingConfig(temperature=[1.0, 1.0, 1.0]), max_new_tokens=2)


# ---------------------------------------------------------------------------------------
# A Linen module through the adapter.


class LinenMarkov(nn.Module):
    """The Markov fake as a Linen module: logits = table[token], cache of written tokens."""

    vocab_size: int

    def setup(self):
        self.table = self.param("table", nn.initializers.normal(1.0), (self.vocab_size, self.vocab_size))

    def __call__(self, tokens, positions, cache, exit_layer=None):
        rows = jnp.arange(tokens.shape[0])[:, None]
        return self.table[tokens], cache.at[rows, positions].set(tokens, mode="drop")

    def init_cache(self, batch_size, max_length):
        return jnp.full((batch_size, max_length), -1, jnp.int32)


def test_linen_model_generates(model):
    module = LinenMarkov(VOCAB)
    variables = module.init(
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, 2), jnp.int32),
        jnp.full((1, 4), -1, jnp.int32),
    )
    assert variables["params"]["table"].shape == (VOCAB, VOCAB)
    linen = LinenModel(module, {"params": {"table": model.table}})
    assert linen.num_layers is None
    params = dict(temperature=0.9, top_k=6, repetition_penalty=1.2)
    out = run_small(linen, **params)
    assert isinstance(out, GenerationOutput)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(run_small(model, **params).tokens))
    greedy = run_small(linen, temperature=0.0)
    for b, row in enumerate(RAGGED):
        chain = greedy_chain(model.table, row, SMALL_NEW_TOKENS)
        np.testing.assert_array_equal(np.asarray(greedy.tokens[b]), chain)
