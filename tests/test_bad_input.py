"""Bad input at the Python boundary of the decoders and `sample` (one clear error naming
the argument), and the documented NaN-free outcomes of traced inf/NaN values inside `jit`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.decoding import generate, self_speculative_generate, speculative_generate
from rtdlm.decoding.testing import MarkovModel, random_markov_model
from rtdlm.sampling import SamplingConfig, process_logits, sample

VOCAB = 8


@pytest.fixture(scope="module")
def model():
    return random_markov_model(VOCAB, seed=0, num_layers=3)


def decoders(model):
    return {
        "generate": lambda **kw: generate(model, **kw),
        "speculative": lambda **kw: speculative_generate(model, model, num_speculative_tokens=2, **kw),
        "self_speculative": lambda **kw: self_speculative_generate(
            model, early_exit_layer=1, num_speculative_tokens=2, **kw
        ),
    }


@pytest.mark.parametrize("decoder", ["generate", "speculative", "self_speculative"])
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(prompt_tokens=[[1, 2, VOCAB]]), ValueError, "prompt_tokens"),
        (dict(prompt_tokens=[[1, -1, 2]]), ValueError, "prompt_tokens"),
        (dict(prompt_lengths=[2.7]), TypeError, "prompt_lengths"),
        (dict(pad_token_id=1.5), TypeError, "pad_token_id"),
        (dict(eos_token_id=2**32 + 9), ValueError, "eos_token_id"),
        (dict(config=SamplingConfig(banned_token_ids=[[1], [2]])), ValueError, "rows"),
        (dict(config=SamplingConfig(logit_bias=[{1: 1.0}, {2: 1.0}, {3: 1.0}])), ValueError, "rows"),
    ],
)
def test_decoder_arguments_are_checked(model, decoder, changes, error, match):
    kwargs = dict(prompt_tokens=[[1, 2, 3]], key=jax.random.key(0), config=SamplingConfig(), max_new_tokens=4)
    with pytest.raises(error, match=match):
        decoders(model)[decoder](**{**kwargs, **changes})


def test_padding_past_a_prompt_length_is_not_checked(model):
    out = generate(
        model,
        [[1, 2, -5]],
        prompt_lengths=[2],
        key=jax.random.key(0),
        config=SamplingConfig(),
        max_new_tokens=3,
    )
    assert out.tokens.shape == (1, 3)


@pytest.mark.parametrize("decoder", ["speculative", "self_speculative"])
def test_speculative_decoders_need_a_row(model, decoder):
    with pytest.raises(ValueError, match="at least one prompt row"):
        decoders(model)[decoder](
            prompt_tokens=jnp.zeros((0, 3), jnp.int32),
            key=jax.random.key(0),
            config=SamplingConfig(),
            max_new_tokens=4,
        )


def test_cache_slot_error_names_the_speculative_slots():
    class Limited(MarkovModel):
        @property
        def max_length(self):
            return 8

    limited = Limited(random_markov_model(VOCAB).table)
    with pytest.raises(ValueError, match="2 slots for the K speculative tokens"):
        speculative_generate(
            limited,
            limited,
            [[1, 2, 3]],
            key=jax.random.key(0),
            config=SamplingConfig(),
            max_new_tokens=4,
            num_speculative_tokens=2,
        )


def test_early_exit_layer_accepts_numpy_ints(model):
    out = self_speculative_generate(
        model,
        [[1, 2, 3]],
        key=jax.random.key(0),
        config=SamplingConfig(),
        max_new_tokens=4,
        early_exit_layer=np.int64(1),
    )
    assert out.tokens.shape == (1, 4)


def test_empty_vocabulary_logits_raise():
    with pytest.raises(ValueError, match="V >= 1"):
        sample(jax.random.key(0), jnp.zeros((2, 0)), SamplingConfig())


@pytest.mark.parametrize(
    "field", ["temperature", "repetition_penalty", "presence_penalty", "frequency_penalty"]
)
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_traced_inf_and_nan_values_never_give_nan(field, value):
    """Traced values cannot be checked: inside jit an inf/NaN temperature or penalty has a
    documented outcome (see the processors' docstrings) and never a NaN probability."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    history = jnp.asarray(rng.integers(0, 16, size=(4, 5)), jnp.int32)

    @jax.jit
    def run(value):
        config = SamplingConfig(**{field: jnp.full(4, value, jnp.float32)})
        return process_logits(logits, config, history), sample(jax.random.key(0), logits, config, history)

    processed, result = run(value)
    assert not np.isnan(np.asarray(processed)).any()
    assert np.isfinite(np.asarray(processed)).any(axis=-1).all()  # something stays kept
    probabilities = np.asarray(result.all_probabilities)
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(-1), 1.0, atol=1e-5)
