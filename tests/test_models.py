"""Tests of the reference transformer: the model contract, the KV cache, early exit."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtdlm.models import data as data_lib
from rtdlm.models.transformer import (
    Transformer,
    TransformerConfig,
    bundled_models,
    create_model,
    load_model,
    model_from_bytes,
    model_to_bytes,
    param_count,
    widen_mlp,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "models", "tiny.yaml")

SMALL = dict(d_model=32, num_layers=3, num_heads=2, mlp_dim=48, max_length=64)


def _randomize_head(model: Transformer, seed: int = 1) -> Transformer:
    """The head is zero-initialised (uniform logits); give it values so tests see signal."""
    kernel = model.head.kernel
    kernel[...] = 0.5 * jax.random.normal(jax.random.key(seed), kernel[...].shape)
    return model


@pytest.fixture(scope="module")
def model():
    return _randomize_head(create_model(SMALL, nnx.Rngs(0)))


@jax.jit
def _call(model, tokens, positions, cache):
    return model(tokens, positions, cache)


def _positions(batch, length, offset=0):
    return jnp.broadcast_to(jnp.arange(offset, offset + length, dtype=jnp.int32), (batch, length))


def _tokens(batch, length, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256, dtype=jnp.int32)


def test_shapes_dtypes_and_attributes(model):
    tokens = _tokens(2, 5)
    cache = model.init_cache(2, 24)
    assert isinstance(cache, tuple) and len(cache) == model.num_layers
    keys, values = cache[0]  # batch and heads merged: [B*H, Dh, S] and [B*H, S, Dh]
    assert keys.shape == (4, 16, 24) and values.shape == (4, 24, 16) and keys.dtype == jnp.float32
    logits, new_cache = _call(model, tokens, _positions(2, 5), cache)
    assert logits.shape == (2, 5, 256) and logits.dtype == jnp.float32
    assert jax.tree.structure(new_cache) == jax.tree.structure(cache)
    assert model.num_layers == 3 and model.vocab_size == 256 and model.max_length == 64
    assert isinstance(model.num_layers, int)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_cache_matches_full_forward(model):
    """Prefill of P tokens then one-token decode steps == one full forward pass."""
    batch, length, prefill = 2, 12, 5
    tokens = _tokens(batch, length)
    full, _ = _call(model, tokens, _positions(batch, length), None)
    full_cached, _ = _call(model, tokens, _positions(batch, length), model.init_cache(batch, 32))
    np.testing.assert_allclose(full_cached, full, atol=1e-5)

    logits, cache = _call(model, tokens[:, :prefill], _positions(batch, prefill),
                          model.init_cache(batch, 32))
    pieces = [logits]
    for t in range(prefill, length):
        logits, cache = _call(model, tokens[:, t:t + 1], _positions(batch, 1, t), cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_ragged_positions_per_row(model):
    """Rows at different positions in one call equal each row run on its own."""
    tokens = _tokens(2, 10, seed=3)
    # Right-padded prefill: row 0 has 7 real tokens, row 1 has 4.
    lengths = [7, 4]
    cache = model.init_cache(2, 32)
    _, cache = _call(model, tokens[:, :7], _positions(2, 7), cache)
    # Next tokens go at each row's own length: two decode steps with ragged positions.
    next_tokens = jnp.array([[11, 12], [21, 22]], jnp.int32)
    got = []
    for j in range(2):
        pos = jnp.array([[lengths[0] + j], [lengths[1] + j]], jnp.int32)
        logits, cache = _call(model, next_tokens[:, j:j + 1], pos, cache)
        got.append(logits)
    got = jnp.concatenate(got, axis=1)  # [2, 2, V]
    for row, n in enumerate(lengths):
        sequence = jnp.concatenate([tokens[row, :n], next_tokens[row]])[None]  # [1, n + 2]
        reference, _ = _call(model, sequence, _positions(1, n + 2), None)
        np.testing.assert_allclose(got[row], reference[0, n:], atol=1e-5)


def test_rollback_by_rewriting_smaller_positions(model):
    """Writing stale drafts, then re-writing from a smaller position == a fresh run."""
    batch = 2
    prefix, drafts, accepted = _tokens(batch, 6, seed=4), _tokens(batch, 4, seed=5), 1
    cache = model.init_cache(batch, 24)
    _, cache = _call(model, prefix, _positions(batch, 6), cache)
    # Verify 4 drafts (writes slots 6..9) and reject all but the first.
    _, cache = _call(model, drafts, _positions(batch, 4, 6), cache)
    replacement = _tokens(batch, 3, seed=6)
    got, _ = _call(model, replacement, _positions(batch, 3, 6 + accepted), cache)

    fresh_tokens = jnp.concatenate([prefix, drafts[:, :accepted], replacement], axis=1)
    reference, _ = _call(model, fresh_tokens, _positions(batch, fresh_tokens.shape[1]), None)
    np.testing.assert_allclose(got, reference[:, 6 + accepted:], atol=1e-5)


def test_verification_block_matches_steps(model):
    """T = K + 1 verification in one call equals K + 1 one-token calls."""
    tokens = _tokens(1, 9, seed=7)
    cache = model.init_cache(1, 16)
    _, cache = _call(model, tokens[:, :4], _positions(1, 4), cache)
    block, _ = _call(model, tokens[:, 4:], _positions(1, 5, 4), cache)
    steps, step_cache = [], cache
    for t in range(4, 9):
        logits, step_cache = _call(model, tokens[:, t:t + 1], _positions(1, 1, t), step_cache)
        steps.append(logits)
    np.testing.assert_allclose(block, jnp.concatenate(steps, axis=1), atol=1e-5)


def test_early_exit_equals_staged_calls(model):
    tokens, positions = _tokens(2, 6, seed=8), _positions(2, 6)
    cache = model.init_cache(2, 8)

    @jax.jit
    def every_exit(m, tokens, positions, cache):
        results = []
        for exit_layer in range(1, m.num_layers + 1):
            early = m(tokens, positions, cache, exit_layer=exit_layer)
            hidden, staged_cache = m.run_layers(m.embed(tokens), positions, cache, 0, exit_layer)
            results.append((early, (m.logits(hidden), staged_cache)))
        return results, m(tokens, positions, cache)

    results, (full, full_cache) = every_exit(model, tokens, positions, cache)
    for exit_layer, ((early, early_cache), (staged, staged_cache)) in enumerate(results, 1):
        np.testing.assert_allclose(early, staged, atol=1e-5)
        for layer in range(model.num_layers):
            for a, b in zip(early_cache[layer], staged_cache[layer], strict=True):
                np.testing.assert_allclose(a, b, atol=1e-6)
            if layer >= exit_layer:  # layers at or beyond the exit leave the cache alone
                assert not np.any(np.asarray(early_cache[layer][0]))
    last, last_cache = results[-1][0]
    np.testing.assert_allclose(last, full, atol=1e-6)
    for a, b in zip(jax.tree.leaves(last_cache), jax.tree.leaves(full_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Early exit differs from the full model (the exit is not a no-op).
    assert not np.allclose(results[0][0][0], full)


def test_staged_layers_continue_the_cache(model):
    """run_layers(0, E) then run_layers(E, L) == the full model, cache included."""
    tokens, positions = _tokens(1, 5, seed=9), _positions(1, 5)
    cache = model.init_cache(1, 8)

    @jax.jit
    def staged_and_full(m, tokens, positions, cache):
        hidden, staged = m.run_layers(m.embed(tokens), positions, cache, 0, 2)
        hidden, staged = m.run_layers(hidden, positions, staged, 2, m.num_layers)
        return (m.logits(hidden), staged), m(tokens, positions, cache)

    (logits, staged), (full, full_cache) = staged_and_full(model, tokens, positions, cache)
    np.testing.assert_allclose(logits, full, atol=1e-5)
    for a, b in zip(jax.tree.leaves(staged), jax.tree.leaves(full_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_arguments_raise(model):
    tokens, positions = _tokens(1, 3), _positions(1, 3)
    with pytest.raises(ValueError, match="exit_layer"):
        model(tokens, positions, None, exit_layer=0)
    with pytest.raises(ValueError, match="exit_layer"):
        model(tokens, positions, None, exit_layer=model.num_layers + 1)
    with pytest.raises(TypeError, match="exit_layer"):
        model(tokens, positions, None, exit_layer=1.5)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(tokens[0], positions[0], None)
    with pytest.raises(ValueError, match="num_heads"):
        TransformerConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        create_model(dict(SMALL, hidden=3))


def test_jit_traces_model_as_argument_once(model):
    """The model is an ordinary jit argument: new parameter values do not recompile."""
    traces = []

    @jax.jit
    def forward(m, tokens, positions):
        traces.append(1)
        return m(tokens, positions, None)[0]

    tokens, positions = _tokens(1, 4), _positions(1, 4)
    forward(model, tokens, positions)
    other = _randomize_head(create_model(SMALL, nnx.Rngs(1)), seed=2)
    out_other = forward(other, tokens, positions)
    assert len(traces) == 1
    np.testing.assert_allclose(out_other, other(tokens, positions, None)[0], atol=1e-5)


def test_gelu_tied_variant_and_yaml_config():
    variant = create_model(dict(SMALL, mlp_type="gelu", tie_embeddings=True), 0)
    assert variant.head is None
    logits, _ = variant(_tokens(1, 4), _positions(1, 4), variant.init_cache(1, 8))
    assert logits.shape == (1, 4, 256) and np.all(np.isfinite(np.asarray(logits)))
    tiny = create_model(TINY_YAML, nnx.Rngs(0))
    assert tiny.num_layers == 2 and tiny.config.d_model == 32


def test_serialization_round_trip(model):
    tokens, positions = _tokens(1, 6), _positions(1, 6)
    expected, _ = model(tokens, positions, None)
    restored, meta = model_from_bytes(model_to_bytes(model, dtype=None, metadata={"a": 1}))
    assert meta == {"a": 1}
    np.testing.assert_array_equal(restored(tokens, positions, None)[0], expected)
    half, _ = model_from_bytes(model_to_bytes(model, dtype="float16"))
    assert half.head.kernel[...].dtype == jnp.float32  # cast back on load
    np.testing.assert_allclose(half(tokens, positions, None)[0], expected, atol=0.05)


def test_tokenizer_round_trip():
    text = "def f(x):\n    return 'héllo'\n"
    ids = data_lib.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert data_lib.decode(ids) == text
    assert data_lib.decode([0xFF, 104]) == "\ufffdh"


@pytest.mark.skipif(not bundled_models(), reason="no bundled weights yet")
@pytest.mark.parametrize("name", ["target", "draft"])
def test_bundled_weights_load_and_predict_python(name):
    model = load_model(name)
    assert model.vocab_size == 256
    prompt = "import os\nimport sys\n\n\ndef main():\n    "
    tokens = jnp.asarray(data_lib.encode(prompt))[None]
    logits, _ = _call(model, tokens, _positions(1, tokens.shape[1]), model.init_cache(1, 64))
    log_probs = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    ce = -np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(tokens[0, 1:, None]), 1))
    # A trained byte model is far better than uniform (ln 256 = 5.5 nats) on code.
    assert ce < 3.0
    # The bundled file loads with float32 parameters.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_sliding_window_limits_the_receptive_field():
    """With window W each layer looks back W-1 positions, so after L layers the logits at
    position p depend only on tokens p - L(W-1) .. p (and not on the absolute position,
    RoPE being relative)."""
    window = 3
    model = _randomize_head(create_model(dict(SMALL, attention_window=window), nnx.Rngs(0)))
    reach = model.num_layers * (window - 1) + 1  # 7 tokens
    tokens = _tokens(1, 12, seed=10)
    cache = model.init_cache(1, 16)
    full, _ = _call(model, tokens, _positions(1, 12), cache)
    for p in (6, 9, 11):
        crop = tokens[:, p - reach + 1: p + 1]
        local, _ = _call(model, crop, _positions(1, reach, offset=2), model.init_cache(1, 16))
        np.testing.assert_allclose(full[:, p], local[:, -1], atol=1e-4)
    # Without a window, the earliest token still matters.
    unwindowed = _randomize_head(create_model(dict(SMALL, attention_window=None), nnx.Rngs(0)))
    full_all, _ = _call(unwindowed, tokens, _positions(1, 12), cache)
    crop_all, _ = _call(unwindowed, tokens[:, 1:], _positions(1, 11), cache)
    assert not np.allclose(full_all[:, 11], crop_all[:, -1], atol=1e-4)


def test_widen_mlp_keeps_the_function_and_adds_the_weights(model):
    wide = widen_mlp(model, model.config.mlp_dim + 96)
    tokens = _tokens(2, 7)
    positions = _positions(2, 7)
    logits, _ = _call(model, tokens, positions, model.init_cache(2, 8))
    wide_logits, _ = _call(wide, tokens, positions, wide.init_cache(2, 8))
    np.testing.assert_allclose(wide_logits, logits, rtol=1e-5, atol=1e-5)
    d_model = model.config.d_model
    assert param_count(wide) - param_count(model) == model.num_layers * 3 * d_model * 96
    with pytest.raises(ValueError, match="mlp_dim"):
        widen_mlp(model, model.config.mlp_dim - 1)


WINDOWED = dict(SMALL, attention_window=8)


@pytest.fixture(scope="module")
def windowed_model():
    return _randomize_head(create_model(WINDOWED, nnx.Rngs(0)))


def test_windowed_cache_matches_full_forward_past_the_window(windowed_model):
    """A prefill longer than the window, then one-token steps and (K + 1)-token verification
    blocks with rollbacks, rows at different positions, in a cache 6 windows long: every
    call's logits equal the full forward pass of the sequence it has seen (the forward pass
    attends by position, not through the cache)."""
    model, batch, num_slots = windowed_model, 2, 48
    window = model.config.attention_window
    stream = _tokens(batch, num_slots, seed=11)
    cache = model.init_cache(batch, num_slots)
    lengths = np.array([13, 10])  # right-padded prefill longer than the window
    _, cache = _call(model, stream[:, :13], _positions(batch, 13), cache)
    sequences = [list(np.asarray(stream[b, :n])) for b, n in enumerate(lengths)]
    rng = np.random.default_rng(0)
    checked_past_window = 0
    for call in range(12):
        width = 1 if call % 3 == 0 else 4  # a decode step, or a K=3 verification block
        positions = jnp.asarray(lengths[:, None] + np.arange(width)[None], jnp.int32)  # [B, T]
        tokens = jnp.asarray(rng.integers(0, 256, (batch, width)), jnp.int32)
        got, cache = _call(model, tokens, positions, cache)
        for b in range(batch):
            seen = sequences[b] + list(np.asarray(tokens[b]))
            # Padded to one length (causal: the padding after it changes nothing): one compile.
            padded = jnp.asarray(seen + [0] * (num_slots - len(seen)), jnp.int32)[None]
            reference, _ = _call(model, padded, _positions(1, num_slots), None)
            np.testing.assert_allclose(got[b], reference[0, lengths[b]:len(seen)], atol=1e-5)
        checked_past_window += int(np.sum(lengths >= window))
        # Keep a random number of the block's tokens (0 .. T): the rest are rolled back.
        kept = rng.integers(0, width + 1, batch) if width > 1 else np.ones(batch, int)
        for b in range(batch):
            sequences[b] += list(np.asarray(tokens[b, :kept[b]]))
        lengths = lengths + kept
    assert lengths.max() + 4 <= num_slots and checked_past_window > 10


def test_prefill_longer_than_the_window_then_decode(windowed_model):
    model = windowed_model
    tokens = _tokens(1, 30, seed=12)
    full, _ = _call(model, tokens, _positions(1, 30), None)
    logits, cache = _call(model, tokens[:, :20], _positions(1, 20), model.init_cache(1, 64))
    pieces = [logits]
    for t in range(20, 30):
        logits, cache = _call(model, tokens[:, t:t + 1], _positions(1, 1, t), cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_windowed_decode_step_cost_does_not_grow_with_the_cache(windowed_model):
    """A one-token step reads the window's slots only: its flop count is the same for a cache
    of 16 slots and of 1024 (without a window it grows with the cache)."""

    def step_flops(model, num_slots):
        cache = model.init_cache(2, num_slots)
        step = jax.jit(lambda m, t, p, c: m(t, p, c))
        args = (jnp.zeros((2, 1), jnp.int32), jnp.full((2, 1), num_slots - 1, jnp.int32), cache)
        return step.lower(model, *args).compile().cost_analysis()["flops"]

    assert step_flops(windowed_model, 16) == step_flops(windowed_model, 1024)
    unwindowed = create_model(dict(SMALL, attention_window=None), nnx.Rngs(0))
    assert step_flops(unwindowed, 1024) > step_flops(unwindowed, 16)


@pytest.mark.parametrize("extra", [{}, {"attention_window": 8}, {"num_heads": 4, "num_kv_heads": 2}])
def test_prefill_equals_the_cached_call(extra):
    """`prefill` (attention within the call) returns the logits and the cache of the general
    cached call for a right-padded prompt from position 0, and decoding continues from it."""
    model = _randomize_head(create_model(dict(SMALL, **extra), nnx.Rngs(0)))
    batch, prompt_len, num_slots = 3, 13, 32
    tokens = _tokens(batch, prompt_len + 4, seed=7)
    prefill = jax.jit(lambda m, t, p, c: m.prefill(t, p, c))
    fresh = model.init_cache(batch, num_slots)
    got, got_cache = prefill(model, tokens[:, :prompt_len], _positions(batch, prompt_len), fresh)
    want, want_cache = _call(model, tokens[:, :prompt_len], _positions(batch, prompt_len), fresh)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got_cache[0][0], want_cache[0][0])  # layer 0: the same keys
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-5)  # later: rounding apart
    full, _ = _call(model, tokens, _positions(batch, prompt_len + 4), None)
    step, _ = _call(model, tokens[:, prompt_len:], _positions(batch, 4, prompt_len), got_cache)
    np.testing.assert_allclose(step, full[:, prompt_len:], atol=1e-5)
