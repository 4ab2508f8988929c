"""Tests of `rtdlm.decoding.self_speculative_generate`: the model's own early exit drafts.

With the Markov fake, `exit_layer=e` reads another table, so drafts differ from the target
while the output must still follow the full model exactly. The shared-layers path
(LayerSkip-style reuse of the draft's hidden states and cache) is checked against the
full-recompute path on the real transformer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov_reference import check_eos_rows, chisquare_pvalue, greedy_chain, markov_joint

from rtdlm.decoding import GenerationOutput, SelfSpeculativeDecoder, generate, self_speculative_generate
from rtdlm.decoding.testing import random_markov_model
from rtdlm.sampling import SamplingConfig

VOCAB = 8
NUM_LAYERS = 3
PROMPT = np.array([3, 1, 5], np.int32)
BIG_ROWS = 60_000
P_MIN = 1e-4
# (early_exit_layer, num_speculative_tokens): exit 2 reads a table close to the final one
# (most drafts accepted), exit 1 a noisier one (most rejected). One compiled program each.
LOSSLESS_SETTING = (2, 2)
GREEDY_SETTING = (1, 4)  # shared with the facade test


@pytest.fixture(scope="module")
def model():
    return random_markov_model(VOCAB, seed=0, num_layers=NUM_LAYERS)


def check_counts(out, k, max_new_tokens):
    drafted, accepted = np.asarray(out.num_drafted), np.asarray(out.num_accepted)
    assert drafted.shape == accepted.shape == out.lengths.shape
    assert np.all(drafted % k == 0) and np.all((accepted >= 0) & (accepted <= drafted))
    assert np.all(drafted <= k * (max_new_tokens - 1))
    return drafted, accepted


def test_exits_read_other_tables(model):
    logits = [model(jnp.asarray([[3]]), jnp.asarray([[0]]), model.init_cache(1, 2), exit_layer=e)[0]
              for e in (1, 2, None)]
    assert not np.allclose(logits[0], logits[2]) and not np.allclose(logits[1], logits[2])


# ---------------------------------------------------------------------------------------
# Lossless.

CONFIGS = {
    "temperature_1": SamplingConfig(temperature=1.0),
    "temperature_0.7_top_k_top_p": SamplingConfig(temperature=0.7, top_k=5, top_p=0.8),
    "repetition_penalty_1.3": SamplingConfig(repetition_penalty=1.3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lossless_joint_of_first_three_tokens(model, name):
    config = CONFIGS[name]
    exit_layer, k = LOSSLESS_SETTING
    out = self_speculative_generate(
        model, jnp.asarray(np.tile(PROMPT, (BIG_ROWS, 1))), key=jax.random.key(200 + k), config=config,
        max_new_tokens=3, early_exit_layer=exit_layer, num_speculative_tokens=k,
    )
    pvalue = chisquare_pvalue(np.asarray(out.tokens), markov_joint(model.table, PROMPT, 3, config))
    drafted, accepted = check_counts(out, k, 3)
    rate = accepted.sum() / drafted.sum()
    print(f"self-speculative {name} exit={exit_layer} K={k}: chi-square p = {pvalue:.4g}, "
          f"acceptance {rate:.2f}")
    assert pvalue > P_MIN, pvalue
    assert 0.05 < rate < 0.95


# ---------------------------------------------------------------------------------------
# Greedy identity with generate on ragged prompts (101 new tokens: no multiple of K+1).

RAGGED = [[4, 2, 6, 1, 3], [5, 0], [7, 7, 2, 4], [6], [2, 2, 2], [0, 1, 2, 3, 4], [3], [1, 6]]
SMALL_NEW_TOKENS = 101  # prime: no multiple of K+1


def small_batch():
    prompt = np.full((len(RAGGED), 5), 1, np.int32)  # padding: a real token id, on purpose
    for b, row in enumerate(RAGGED):
        prompt[b, : len(row)] = row
    return jnp.asarray(prompt), jnp.asarray([len(r) for r in RAGGED], jnp.int32)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.6),
        dict(do_sample=False, repetition_penalty=1.6, eos=3),
    ],
)
def test_greedy_identical_to_generate(model, params):
    exit_layer, k = GREEDY_SETTING
    params = dict(params)
    eos = params.pop("eos", None)
    config = SamplingConfig(**params)
    prompt, lengths = small_batch()
    kwargs = dict(key=jax.random.key(0), config=config, max_new_tokens=SMALL_NEW_TOKENS,
                  prompt_lengths=lengths, eos_token_id=eos)
    out = self_speculative_generate(model, prompt, early_exit_layer=exit_layer, num_speculative_tokens=k,
                                    **kwargs)
    reference = generate(model, prompt, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(reference.lengths))
    check_counts(out, k, SMALL_NEW_TOKENS)
    if eos is None:
        penalty = params.get("repetition_penalty", 1.0)
        for b, row in enumerate(RAGGED):
            chain = greedy_chain(model.table, row, SMALL_NEW_TOKENS, penalty)
            np.testing.assert_array_equal(np.asarray(out.tokens[b]), chain, err_msg=f"row {b}")
    else:
        assert 0 < check_eos_rows(out.tokens, out.lengths, eos, 0) < len(RAGGED)


# ---------------------------------------------------------------------------------------
# Bad input and the facade.


def test_early_exit_layer_out_of_range(model):
    prompt = jnp.asarray(PROMPT[None])
    kwargs = dict(key=jax.random.key(0), config=SamplingConfig(), max_new_tokens=4)
    for layer in (0, NUM_LAYERS, NUM_LAYERS + 1, -1):
        with pytest.raises(ValueError, match="early_exit_layer"):
            self_speculative_generate(model, prompt, early_exit_layer=layer, **kwargs)
        with pytest.raises(ValueError, match="early_exit_layer"):
            SelfSpeculativeDecoder(model=model, early_exit_layer=layer)
    with pytest.raises(TypeError, match="early_exit_layer"):
        self_speculative_generate(model, prompt, early_exit_layer=1.0, **kwargs)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        self_speculative_generate(model, prompt, early_exit_layer=1, num_speculative_tokens=0, **kwargs)
    with pytest.raises(ValueError, match="share_layers"):  # the Markov fake has no embed/run_layers
        self_speculative_generate(model, prompt, early_exit_layer=1, share_layers=True, **kwargs)


def test_guide_facade(model):
    input_ids, _ = small_batch()  # full-length rows this time (no prompt_lengths)
    self_spec = SelfSpeculativeDecoder(model=model, early_exit_layer=1, num_speculative_tokens=4)
    output = self_spec.generate(input_ids, max_new_tokens=SMALL_NEW_TOKENS)
    assert isinstance(output, GenerationOutput)
    assert output.tokens.shape == (len(RAGGED), SMALL_NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(output.lengths), SMALL_NEW_TOKENS)
    drafted, accepted = check_counts(output, 4, SMALL_NEW_TOKENS)
    assert 0 < accepted.sum() < drafted.sum()
    greedy = SelfSpeculativeDecoder(model=model, early_exit_layer=1, num_speculative_tokens=4,
                                    config=SamplingConfig(temperature=0.0))
    greedy = np.asarray(greedy.generate(input_ids, max_new_tokens=SMALL_NEW_TOKENS).tokens)
    for b in range(len(RAGGED)):
        np.testing.assert_array_equal(greedy[b], greedy_chain(model.table, input_ids[b], SMALL_NEW_TOKENS))


# ---------------------------------------------------------------------------------------
# Shared layers (draft hidden states and cache reused) == full recompute, on the transformer.


def check_shared_equals_full(model, exit_layer, k, prompt, lengths, max_new_tokens):
    """Greedy: shared == full recompute == generate, token for token. Sampled with the same
    key: shared == full as well (the two paths compute the same logits up to float
    round-off, so the same uniforms pick the same tokens)."""
    kwargs = dict(key=jax.random.key(0), max_new_tokens=max_new_tokens, prompt_lengths=lengths,
                  early_exit_layer=exit_layer, num_speculative_tokens=k)
    for config in (SamplingConfig(temperature=0.0, repetition_penalty=1.5), SamplingConfig(temperature=1.0)):
        shared = self_speculative_generate(model, prompt, config=config, share_layers=True, **kwargs)
        full = self_speculative_generate(model, prompt, config=config, share_layers=False, **kwargs)
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(full.tokens))
        np.testing.assert_array_equal(np.asarray(shared.num_accepted), np.asarray(full.num_accepted))
        np.testing.assert_array_equal(np.asarray(shared.num_drafted), np.asarray(full.num_drafted))
        # Drafts were both accepted and rejected: every verification branch ran.
        accepted, drafted = np.asarray(shared.num_accepted).sum(), np.asarray(shared.num_drafted).sum()
        assert 0 < accepted < drafted, (config, accepted, drafted)
        if config.temperature == 0.0:
            plain = generate(model, prompt, config=config, key=kwargs["key"], max_new_tokens=max_new_tokens,
                             prompt_lengths=lengths)
            np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
            assert len({tuple(r) for r in np.asarray(shared.tokens).tolist()}) == prompt.shape[0]


def test_shared_layers_equal_full_recompute_tiny_transformer():
    transformer = pytest.importorskip("rtdlm.models.transformer")
    from flax import nnx

    config = transformer.TransformerConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=2, mlp_dim=32,
                                           tie_embeddings=True, max_length=64)
    model = transformer.create_model(config, rngs=0)
    # Freshly initialised blocks barely move the residual stream (every exit would agree and
    # greedy output would repeat one token): scale them up so exits disagree.
    nnx.update(model.blocks, jax.tree.map(lambda x: 4.0 * x, nnx.state(model.blocks, nnx.Param)))
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 5, 1])
    prompt = rng.integers(0, 32, size=(4, 7)).astype(np.int32)
    prompt[np.arange(7) >= lengths[:, None]] = 0
    check_shared_equals_full(model, 2, 3, jnp.asarray(prompt), jnp.asarray(lengths), 30)


@pytest.mark.slow
def test_shared_layers_equal_full_recompute_bundled_model():
    models = pytest.importorskip("rtdlm.models")
    if "target" not in models.bundled_models():
        pytest.skip("no bundled target model in rtdlm/models/weights/")
    model = models.load_model("target")
    texts = ["def fibonacci(n):\n    ", "import numpy as np\nimport ", "class "]
    rows = [models.encode(text) for text in texts]
    prompt = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, row in enumerate(rows):
        prompt[b, : len(row)] = row
    lengths = jnp.asarray([len(row) for row in rows], jnp.int32)
    check_shared_equals_full(model, model.num_layers // 2, 4, jnp.asarray(prompt), lengths, 32)
