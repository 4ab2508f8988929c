"""`SamplingConfig`: validation at the Python boundary, presets, loaders, PyTree behaviour."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.sampling import (
    PRESETS,
    SamplingConfig,
    create_sampling_config_balanced,
    create_sampling_config_creative,
    create_sampling_config_deterministic,
    create_sampling_config_precise,
    process_logits,
    sample,
)

FLOAT_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
]

INVALID_VALUES = [
    ("temperature", -0.1),
    ("temperature", -1),
    ("temperature", math.inf),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.0001),
    ("top_p", 2),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", math.inf),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("typical_p", 0.0),
    ("typical_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.1),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", 1.5),
    ("seed", math.nan),
    ("min_new_tokens", -1),
    ("eos_token_id", -2),
]


def assert_configs_equal(a: SamplingConfig, b: SamplingConfig) -> None:
    """Same tree structure (static fields included), same leaf values and dtypes."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- validation ------------------------------------------------------------------------------
def test_defaults_are_off_values():
    config = SamplingConfig()
    assert float(config.temperature) == 1.0
    assert int(config.top_k) == 0
    assert float(config.top_p) == 1.0
    assert float(config.min_p) == 0.0
    assert float(config.typical_p) == 1.0
    assert float(config.repetition_penalty) == 1.0
    assert float(config.presence_penalty) == 0.0
    assert float(config.frequency_penalty) == 0.0
    assert bool(config.do_sample) is True
    assert config.seed is None


@pytest.mark.parametrize(("field", "value"), INVALID_VALUES)
def test_invalid_scalar_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), INVALID_VALUES)
def test_invalid_value_inside_a_per_row_array_raises(field, value):
    valid = {
        "temperature": 0.5,
        "top_p": 0.5,
        "top_k": 3,
        "min_p": 0.5,
        "typical_p": 0.5,
        "repetition_penalty": 1.5,
        "seed": 7,
        "min_new_tokens": 2,
        "eos_token_id": 3,
    }
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: [valid[field], value, valid[field]]})


@pytest.mark.parametrize("field", [*FLOAT_FIELDS, "top_k", "seed"])
def test_nan_raises_value_error_naming_the_field(field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: math.nan})
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: np.array([1.0, np.nan], np.float32)})


def test_concrete_jax_arrays_are_validated_too():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=jnp.array(-1.0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=jnp.array([0.5, 0.0]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("top_p", 1.0),
        ("top_p", 1e-6),
        ("min_p", 0.0),
        ("min_p", 1.0),
        ("typical_p", 1.0),
        ("top_k", 0),
        ("top_k", 10**6),
        ("seed", 0),
        ("seed", 2**32 - 1),
        ("presence_penalty", -2.0),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", 1e-3),
    ],
)
def test_boundary_values_are_accepted(field, value):
    config = SamplingConfig(**{field: value})
    assert np.asarray(getattr(config, field)).item() == pytest.approx(value)


def test_integer_valued_floats_are_accepted_for_integer_fields():
    config = SamplingConfig(top_k=5.0, seed=3.0)
    assert np.asarray(config.top_k).dtype == np.int32 and int(config.top_k) == 5
    assert int(config.seed) == 3


@pytest.mark.parametrize("field", ["temperature", "top_k", "top_p", "seed"])
def test_non_numeric_values_raise_type_error(field):
    with pytest.raises(TypeError, match=field):
        SamplingConfig(**{field: "high"})


@pytest.mark.parametrize("field", ["temperature", "top_k", "top_p", "min_p", "typical_p", "seed"])
def test_two_dimensional_fields_raise(field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: np.ones((2, 2))})


def test_per_row_sizes_that_disagree_raise_before_tracing():
    logits = jnp.zeros((3, 8))
    # Rejected at the latest when the config meets logits (not deferred into jit).
    with pytest.raises(ValueError, match="disagree"):
        config = SamplingConfig(temperature=[0.5, 0.7], top_k=[1, 2, 3])
        process_logits(logits, config)


def test_per_row_size_must_match_the_batch():
    config = SamplingConfig(temperature=[0.5, 0.7, 1.0])
    with pytest.raises(ValueError, match="3 rows"):
        process_logits(jnp.zeros((2, 8)), config)
    with pytest.raises(ValueError, match="rows"):
        sample(jax.random.key(0), jnp.zeros((4, 8)), config)
    with pytest.raises(ValueError, match="batch axis"):
        process_logits(jnp.zeros(8), config)  # per-row values need [B, V] logits


def test_batch_size():
    assert SamplingConfig().batch_size() is None
    assert SamplingConfig(top_p=[0.5, 0.9], seed=[1, 2]).batch_size() == 2


@pytest.mark.parametrize("field", ["num_candidates", "num_top_tokens"])
@pytest.mark.parametrize("value", [0, -3, 2.0, True, None])
def test_static_fields_must_be_positive_python_ints(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_logit_bias_and_banned_tokens_validation():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingConfig(logit_bias={-3: 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingConfig(logit_bias={3: math.nan})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingConfig(logit_bias={3: math.inf})
    with pytest.raises(ValueError, match="banned_token_ids"):
        SamplingConfig(banned_token_ids=[1, -2])
    with pytest.raises(ValueError, match="banned_token_ids"):
        SamplingConfig(banned_token_ids=[[1], [4, -3]])


@pytest.mark.parametrize("value", [[(3, 1.0)], "3:1.0", 3.0])
def test_logit_bias_of_the_wrong_type_raises_type_error_when_built(value):
    with pytest.raises(TypeError, match="logit_bias"):
        SamplingConfig(logit_bias=value)


@pytest.mark.parametrize("value", [np.array([1, -2]), np.array([0.5, 1.0]), np.zeros((2, 2, 2), np.int32)])
def test_banned_token_ids_arrays_are_validated_when_built(value):
    with pytest.raises((ValueError, TypeError), match="banned_token_ids"):
        SamplingConfig(banned_token_ids=value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="temprature"):
        SamplingConfig.from_dict({"temprature": 0.7})
    assert_configs_equal(SamplingConfig.from_dict({"top_k": 5}), SamplingConfig(top_k=5))


# ---- presets ---------------------------------------------------------------------------------
PRESET_VALUES = {
    "creative": (
        create_sampling_config_creative,
        dict(temperature=1.2, top_p=0.95, top_k=100, repetition_penalty=1.1),
    ),
    "precise": (
        create_sampling_config_precise,
        dict(temperature=0.3, top_p=0.9, top_k=20, repetition_penalty=1.05),
    ),
    "balanced": (
        create_sampling_config_balanced,
        dict(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0),
    ),
    "deterministic": (create_sampling_config_deterministic, dict(temperature=0.0, do_sample=False)),
}


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_preset_has_the_guide_values(name):
    factory, values = PRESET_VALUES[name]
    config = factory()
    # exactly the guide's values, every other field at its default ("off")
    assert_configs_equal(config, SamplingConfig(**values))
    for field, value in values.items():
        assert np.asarray(getattr(config, field)).item() == pytest.approx(value, rel=0, abs=1e-7)
    assert PRESETS[name] is factory


def test_deterministic_preset_is_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 100)).astype(np.float32))
    result = sample(jax.random.key(1), logits, create_sampling_config_deterministic())
    np.testing.assert_array_equal(result.token_id, np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(result.probability, 1.0)


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_yaml_copy_equals_the_preset(name, repo_root):
    path = repo_root / "configs" / "sampling" / f"{name}.yaml"
    assert path.is_file(), path
    assert_configs_equal(SamplingConfig.from_yaml(path), PRESET_VALUES[name][0]())


def test_from_yaml_rejects_bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError):
        SamplingConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("top_p: 1.5\n")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "unknown.yaml").write_text("temperature: 0.5\nbeam_width: 4\n")
    with pytest.raises(ValueError, match="beam_width"):
        SamplingConfig.from_yaml(tmp_path / "unknown.yaml")


# ---- Hugging Face generation_config.json -----------------------------------------------------
def test_from_generation_config_uses_hugging_face_defaults():
    config = SamplingConfig.from_generation_config({})
    assert bool(config.do_sample) is False  # HF default: greedy
    assert int(config.top_k) == 50
    assert float(config.temperature) == 1.0
    assert float(config.top_p) == 1.0
    assert float(config.min_p) == 0.0
    assert float(config.typical_p) == 1.0
    assert float(config.repetition_penalty) == 1.0
    assert int(config.eos_token_id) == -1


def test_from_generation_config_dict():
    config = SamplingConfig.from_generation_config(
        {
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
            "top_k": 0,
            "min_p": 0.05,
            "typical_p": 0.95,
            "repetition_penalty": 1.2,
            "eos_token_id": 7,
            "min_new_tokens": 3,
            "max_length": 4096,
            "pad_token_id": 0,
        }
    )
    expected = SamplingConfig(
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
        top_k=0,
        min_p=0.05,
        typical_p=0.95,
        repetition_penalty=1.2,
        eos_token_id=7,
        min_new_tokens=3,
    )
    assert_configs_equal(config, expected)


def test_from_generation_config_json_file(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(
        json.dumps(
            {
                "_from_model_config": True,
                "bos_token_id": 1,
                "eos_token_id": [2, 32000],
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "max_length": 4096,
                "min_p": None,
                "transformers_version": "4.44.0",
            }
        )
    )
    for source in (path, str(path)):
        config = SamplingConfig.from_generation_config(source)
        assert bool(config.do_sample) is True
        assert float(config.temperature) == pytest.approx(0.6)
        assert float(config.top_p) == pytest.approx(0.9)
        assert int(config.top_k) == 50  # missing -> HF default
        assert float(config.min_p) == 0.0  # null -> off
        assert int(config.eos_token_id) == 2  # the first of a list


def test_from_generation_config_validates():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig.from_generation_config({"temperature": -1.0})
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig.from_generation_config({"top_p": 0.0})


# ---- PyTree ----------------------------------------------------------------------------------
NUMERIC_LEAVES = 12  # every numeric field except seed (None) and the token lists (None)


def test_config_is_a_pytree_of_numeric_leaves():
    config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)
    leaves = jax.tree.leaves(config)
    assert len(leaves) == NUMERIC_LEAVES
    assert all(isinstance(leaf, (np.ndarray, np.generic, jax.Array)) for leaf in leaves)
    values = {float(np.asarray(leaf)) for leaf in leaves if np.ndim(leaf) == 0}
    assert {np.float32(0.7), 50.0, np.float32(0.9)} <= values
    with_seed = jax.tree.leaves(SamplingConfig(seed=3))
    assert len(with_seed) == NUMERIC_LEAVES + 1
    per_row = jax.tree.leaves(SamplingConfig(temperature=[0.1, 0.2, 0.3]))
    assert any(np.shape(leaf) == (3,) for leaf in per_row)


def test_static_fields_are_not_leaves():
    a, b = SamplingConfig(num_candidates=4), SamplingConfig(num_candidates=8)
    assert jax.tree.structure(a) != jax.tree.structure(b)
    assert len(jax.tree.leaves(a)) == NUMERIC_LEAVES


def test_new_values_keep_the_tree_structure():
    a = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, seed=1)
    b = SamplingConfig(temperature=1.3, top_k=3, top_p=0.2, min_p=0.1, repetition_penalty=2.0, seed=9)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)


def test_changing_values_does_not_retrace():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def temperature_times_top_k(config: SamplingConfig):
        return config.temperature * config.top_k + config.top_p - config.min_p

    for t, k, p, m in [(0.7, 50, 0.9, 0.0), (1.2, 100, 0.95, 0.05), (0.0, 0, 1.0, 0.5), (2.0, 1, 0.1, 1.0)]:
        got = temperature_times_top_k(SamplingConfig(temperature=t, top_k=k, top_p=p, min_p=m))
        assert float(got) == pytest.approx(t * k + p - m, rel=1e-6)


def test_traced_values_are_not_validated_inside_jit():
    # Inside jit values cannot be checked; the config must still build from tracers.
    @jax.jit
    def build(temperature):
        return SamplingConfig(temperature=temperature).temperature

    assert float(build(-1.0)) == -1.0


# ---- bad input that used to be accepted silently (issue 12) ---------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2**32 + 3),  # used to wrap to 3
        ("top_k", 2**31),
        ("top_k", 1e40),  # used to become 0 (off)
        ("top_k", 2**70),
        ("top_k", np.int64(2**40)),
        ("top_k", [1, 2**32 + 3]),
        ("eos_token_id", 2**32 + 9),  # used to become 9
        ("eos_token_id", -(2**31) - 1),
        ("min_new_tokens", 2**31),  # used to become negative
        ("min_new_tokens", np.uint64(2**63)),
    ],
)
def test_integer_fields_outside_int32_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_int32_extremes_are_accepted():
    config = SamplingConfig(top_k=2**31 - 1, eos_token_id=2**31 - 1, min_new_tokens=np.int64(2**31 - 1))
    assert int(config.top_k) == int(config.eos_token_id) == int(config.min_new_tokens) == 2**31 - 1


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [1e39, [0.5, 1e39], 10**40])
def test_float_fields_must_be_finite_in_float32(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_must_be_finite_in_float32_below_zero_too(field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: -1e39})


def test_largest_float32_is_accepted():
    big = float(np.finfo(np.float32).max)
    assert float(SamplingConfig(frequency_penalty=big).frequency_penalty) == big


NON_REAL_VALUES = [None, 1j, 1 + 0j, np.complex64(1), {}, {"a": 1}, b"1", [0.5, None], [[0.5], [0.5, 0.7]]]


@pytest.mark.parametrize("field", [*FLOAT_FIELDS, "top_k", "do_sample", "min_new_tokens", "eos_token_id"])
@pytest.mark.parametrize("value", NON_REAL_VALUES)
def test_non_real_values_raise_one_error_naming_the_field(field, value):
    with pytest.raises((TypeError, ValueError), match=field):
        config = SamplingConfig(**{field: value})
        # None is accepted by the constructor (JAX rebuilds trees with None placeholders)
        # and rejected where the config is used
        sample(jax.random.key(0), jnp.zeros(4), config)


def test_seed_none_means_no_seed():
    assert SamplingConfig(seed=None).seed is None


@pytest.mark.parametrize(("field", "value"), [("top_k", True), ("temperature", False), ("do_sample", 0.5)])
def test_booleans_only_for_do_sample(field, value):
    with pytest.raises((TypeError, ValueError), match=field):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize(
    "value",
    [
        [2**40],  # used to ban token 0
        [2**31],
        [2**70],
        [1.9],  # used to become [1]
        [1.0],
        [True],
        np.array([2**40]),
        [[1], [2, 2**40]],  # ragged with a huge id: used to raise a bare OverflowError
        [[1], [2**70]],
        [[1.5], [2]],
        [[1], 2],
        jnp.array([1.0]),
        1.5,
        "3",
    ],
)
def test_bad_banned_token_ids_raise_naming_the_field(value):
    with pytest.raises((TypeError, ValueError), match="banned_token_ids"):
        SamplingConfig(banned_token_ids=value)


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1.0},
        {"3": 1.0},
        {1.5: 1.0},  # used to become token 1
        {True: 1.0},
        {2**40: 1.0},
        {2**31: 1.0},
        {1: "high"},
        {1: None},
        {1: 1j},
        {1: 1e39},  # finite in float64, inf in float32
        {1: -1e39},
        {1: 10**400},
        [{1: 1.0}, {2**40: 1.0}],
        (1, 2),  # used to be accepted and fail later with IndexError
        (np.array([1]), np.array([2])),  # stored form needs int ids and float biases
        (np.array([1, 2]), np.array([1.0])),
        [],
    ],
)
def test_bad_logit_bias_raises_naming_the_field(value):
    with pytest.raises((TypeError, ValueError), match="logit_bias"):
        SamplingConfig(logit_bias=value)


def test_logit_bias_and_banned_ids_survive_jit_and_tree_rebuilds():
    config = SamplingConfig(logit_bias=[{1: 2.0}, {3: -1.0, 4: 0.5}], banned_token_ids=[[0], [2, 5]])
    ids, biases = config.logit_bias
    assert ids.dtype == np.int32 and biases.dtype == np.float32 and ids.shape == (2, 2)
    rebuilt = jax.tree.unflatten(jax.tree.structure(config), jax.tree.leaves(config))
    assert_configs_equal(rebuilt, config)
    assert_configs_equal(jax.jit(lambda c: c)(config), config)
    np.testing.assert_array_equal(config.banned_token_ids, [[0, -1], [2, 5]])


def test_from_generation_config_reads_a_checkpoint_directory(tmp_path):
    """A checkpoint directory, its generation_config.json and the parsed dict give the same
    config; Llama 3's list of EOS ids keeps the first; a directory without the file raises."""
    values = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128008, 128009],
              "max_length": 4096}
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    from_dir = SamplingConfig.from_generation_config(tmp_path)
    assert_configs_equal(from_dir, SamplingConfig.from_generation_config(tmp_path / "generation_config.json"))
    assert_configs_equal(from_dir, SamplingConfig.from_generation_config(values))
    assert from_dir.do_sample and from_dir.temperature == pytest.approx(0.6) and from_dir.top_k == 50
    assert from_dir.eos_token_id == 128001
    assert_configs_equal(SamplingConfig.from_generation_config(str(tmp_path)), from_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="generation_config.json"):
        SamplingConfig.from_generation_config(empty)
