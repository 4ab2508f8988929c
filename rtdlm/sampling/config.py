"""`SamplingConfig`: every sampling setting as a PyTree of traced leaves, plus presets.

Numeric fields are leaves, so a jitted function that takes a config compiles once per
*shape*: changing a temperature, a top-k or a seed never retraces. Each numeric field is
a scalar (the same for every row) or a `[B]` array (one value per row).

"Off" values: `top_k=0`, `top_p=1.0`, `min_p=0.0`, `typical_p=1.0`,
`repetition_penalty=1.0`, `presence_penalty=0.0`, `frequency_penalty=0.0`.
`temperature=0.0` or `do_sample=False` makes a row greedy (argmax of the processed logits).

Python values are checked when the config is built (`ValueError` naming the field).
Traced values cannot be checked; inside `jit` out-of-range values are clamped: a
temperature <= 0 (or NaN) is greedy, `top_k <= 0` is off, `top_p` and `typical_p` are
clipped to (0, 1], `min_p` to [0, 1], and penalties <= 0 are treated as off.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import struct

# field -> (dtype, check(value) -> error message or None)
_FIELDS: dict[str, tuple[Any, Any]] = {
    "temperature": (np.float32, lambda v: None if v >= 0 else "must be >= 0"),
    "top_k": (np.int32, lambda v: None if v >= 0 else "must be >= 0 (0 = off)"),
    "top_p": (np.float32, lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "min_p": (np.float32, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
    "typical_p": (np.float32, lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    "repetition_penalty": (np.float32, lambda v: None if v > 0 else "must be > 0 (1 = off)"),
    "presence_penalty": (np.float32, lambda v: None),
    "frequency_penalty": (np.float32, lambda v: None),
    "do_sample": (np.bool_, lambda v: None if v in (0, 1) else "must be True or False"),
    "seed": (np.uint32, lambda v: None if 0 <= v < 2**32 else "must be in [0, 2**32)"),
    "min_new_tokens": (np.int32, lambda v: None if v >= 0 else "must be >= 0"),
    "eos_token_id": (np.int32, lambda v: None if v >= -1 else "must be a token id or -1 (none)"),
    "min_tokens_to_keep": (np.int32, lambda v: None if v >= 1 else "must be >= 1"),
}
_MAX_TOKEN_ID = int(np.iinfo(np.int32).max)


def _is_concrete(value: Any) -> bool:
    """True for values a user passes (checked on the host); False for tracers and the
    placeholders JAX and its users rebuild trees with (`PartitionSpec`, sentinels, ...)."""
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(
        value, (numbers.Number, str, bytes, list, tuple, Mapping, np.ndarray, np.generic, jax.Array)
    )


def _as_numpy(name: str, value: Any) -> np.ndarray:
    """A real number, or a [B] sequence/array of them, as a NumPy array of its own dtype."""
    if value is None or isinstance(value, (str, bytes, Mapping, complex)):
        raise TypeError(f"SamplingConfig.{name} must be a number or a [B] array of numbers, got {value!r}")
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError):  # ragged nested lists
        raise ValueError(f"SamplingConfig.{name} must be a scalar or a [B] array, got {value!r}") from None
    if (
        raw.dtype == object
        and raw.size
        and all(isinstance(v, numbers.Real) for v in raw.reshape(-1).tolist())
    ):
        # Python ints beyond 64 bits (NumPy keeps them as objects)
        raise ValueError(f"SamplingConfig.{name} is out of range, got {value!r}")
    numeric = jnp.issubdtype(raw.dtype, jnp.integer) or jnp.issubdtype(raw.dtype, jnp.floating)
    if not (numeric or (raw.dtype == np.bool_ and name == "do_sample")):
        raise TypeError(f"SamplingConfig.{name} must be a real number or a [B] array of them, got {value!r}")
    return raw


def _as_field_array(name: str, value: Any) -> np.ndarray:
    dtype, check = _FIELDS[name]
    raw = _as_numpy(name, value)
    if raw.ndim > 1:
        raise ValueError(f"SamplingConfig.{name} must be a scalar or a [B] array, got shape {raw.shape}")
    if not jnp.issubdtype(raw.dtype, jnp.integer):  # float (or bool) values
        raw = raw.astype(np.float64)
        if np.isnan(raw).any():
            raise ValueError(f"SamplingConfig.{name} must not be NaN")
    if (
        np.issubdtype(dtype, np.integer)
        and raw.dtype == np.float64
        and not (np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)))
    ):
        raise ValueError(f"SamplingConfig.{name} must be an integer, got {value!r}")
    for v in raw.reshape(-1).tolist():
        problem = check(v)
        if problem:
            raise ValueError(f"SamplingConfig.{name} {problem}, got {v!r}")
    if np.issubdtype(dtype, np.integer):  # an astype would wrap modulo 2**32
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise ValueError(f"SamplingConfig.{name} must fit in {np.dtype(dtype).name}, got {value!r}")
        return raw.astype(dtype)
    with np.errstate(over="ignore"):
        stored = raw.astype(dtype)
    if dtype == np.float32 and not np.all(np.isfinite(stored)):  # finite as stored, not in float64
        raise ValueError(f"SamplingConfig.{name} must be finite in float32 (|x| <= 3.4e38), got {value!r}")
    return stored


def _id_array(name: str, ids: Any, max_ndim: int) -> np.ndarray:
    """Integer token ids (-1 = padding) as int32, rejecting what an astype would wrap."""
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):  # ragged nested lists
        raise ValueError(
            f"SamplingConfig.{name} must be [N] ids or per-row lists of ids, got {ids!r}"
        ) from None
    if arr.size == 0:
        return np.zeros(arr.shape, np.int32)
    if arr.dtype == object and all(isinstance(v, numbers.Integral) for v in arr.reshape(-1).tolist()):
        raise ValueError(f"SamplingConfig.{name} holds a token id >= 2**31, got {ids!r}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"SamplingConfig.{name} must be integer token ids, got {ids!r}")
    if arr.ndim > max_ndim:
        raise ValueError(f"SamplingConfig.{name} must be [N] or [B, N] token ids, got shape {arr.shape}")
    if arr.min() < -1:
        raise ValueError(f"SamplingConfig.{name} holds a negative token id, got {ids!r}")
    if arr.max() > _MAX_TOKEN_ID:
        raise ValueError(f"SamplingConfig.{name} holds a token id >= 2**31, got {ids!r}")
    return arr.astype(np.int32)


def _ragged_ids(name: str, ids: Any) -> np.ndarray:
    """Token ids as `[N]` or, for a list of per-row lists, `[B, N]` padded with -1."""
    if (
        isinstance(ids, (list, tuple))
        and ids
        and all(isinstance(row, (list, tuple, np.ndarray)) for row in ids)
    ):
        rows = [_id_array(name, row, max_ndim=1).reshape(-1) for row in ids]
        out = np.full((len(rows), max(1, *(row.size for row in rows))), -1, np.int32)
        for b, row in enumerate(rows):
            out[b, : row.size] = row
        return out
    arr = _id_array(name, ids, max_ndim=2)
    return arr.reshape(-1) if arr.ndim == 0 else arr


def _logit_bias(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """{token: bias} (or a list of such dicts, one per row) -> (ids, biases), -1 padded."""
    if isinstance(value, Mapping):
        value = [value]
        squeeze = True
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        squeeze = False
    else:
        raise TypeError(
            f"SamplingConfig.logit_bias must be a {{token_id: bias}} dict or a list of them, got {value!r}"
        )
    width = max(1, max(len(d) for d in value))
    ids = np.full((len(value), width), -1, np.int32)
    biases = np.zeros((len(value), width), np.float32)
    for b, row in enumerate(value):
        for j, (token, bias) in enumerate(row.items()):
            if not isinstance(token, numbers.Integral) or isinstance(token, (bool, np.bool_)):
                raise TypeError(f"SamplingConfig.logit_bias keys must be int token ids, got {token!r}")
            if token < 0:
                raise ValueError(f"SamplingConfig.logit_bias has a negative token id {token}")
            if token > _MAX_TOKEN_ID:
                raise ValueError(f"SamplingConfig.logit_bias has a token id >= 2**31: {token}")
            if not isinstance(bias, numbers.Real) or isinstance(bias, (bool, np.bool_)):
                raise TypeError(f"SamplingConfig.logit_bias[{token}] must be a number, got {bias!r}")
            try:
                bias64 = float(bias)
            except OverflowError:  # a Python int beyond float64
                bias64 = math.inf
            with np.errstate(over="ignore"):
                bias32 = np.float32(bias64)
            if not np.isfinite(bias32):  # finite as stored (float32), not only in float64
                raise ValueError(
                    f"SamplingConfig.logit_bias[{token}] must be finite in float32, got {bias!r}"
                )
            ids[b, j], biases[b, j] = int(token), bias32
    return (ids[0], biases[0]) if squeeze else (ids, biases)


def _stored_logit_bias(value: Any) -> bool:
    """True for the stored `(ids, biases)` pair of arrays (or of tracers / placeholders,
    which JAX rebuilds trees with); False for Python values such as `(1, 2)`."""
    if not (isinstance(value, tuple) and len(value) == 2):
        return False
    ids, biases = value
    if ids is None and biases is None:  # `tree_map` placeholders
        return True
    if any(x is None or isinstance(x, (numbers.Number, str, bytes, list, tuple, Mapping)) for x in value):
        return False
    arrays = isinstance(ids, (np.ndarray, jax.Array)) and isinstance(biases, (np.ndarray, jax.Array))
    if arrays and not (
        jnp.issubdtype(ids.dtype, jnp.integer)
        and jnp.issubdtype(biases.dtype, jnp.floating)
        and ids.shape == biases.shape
        and ids.ndim in (1, 2)
    ):
        raise TypeError(
            "SamplingConfig.logit_bias as arrays must be (int ids, float biases) of one shape "
            f"[N] or [B, N], got {ids.dtype}{list(ids.shape)} and {biases.dtype}{list(biases.shape)}"
        )
    return True


def _check_ngram_fields(config) -> None:
    size = config.no_repeat_ngram_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"SamplingConfig.no_repeat_ngram_size must be an int >= 0 (0 = off), got {size!r}")
    object.__setattr__(config, "no_repeat_ngram_size", int(size))
    words = config.bad_words_ids
    try:
        words = tuple(tuple(int(_exact_int(t)) for t in word) for word in (words or ()))
    except (TypeError, ValueError):
        raise ValueError(f"SamplingConfig.bad_words_ids must be lists of token ids, got {words!r}") from None
    if any(not word or min(word) < 0 or max(word) > _MAX_TOKEN_ID for word in words):
        raise ValueError(f"SamplingConfig.bad_words_ids must be non-empty lists of ids >= 0, got {words!r}")
    object.__setattr__(config, "bad_words_ids", words)


def _exact_int(value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(value)
    return value


@struct.dataclass
class SamplingConfig:
    """All sampling settings. See the module docstring for semantics and "off" values.

    Example:
        >>> config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)
        >>> per_row = SamplingConfig(temperature=np.array([0.0, 0.7, 1.2]))  # mixed batch
    """

    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    repetition_penalty: Any = 1.0
    do_sample: Any = True
    seed: Any = None  # None: rows draw from the key given to `sample`; else one seed per row
    typical_p: Any = 1.0
    presence_penalty: Any = 0.0
    frequency_penalty: Any = 0.0
    # {token: bias}; stored as (ids [N] | [B, N], biases), ids -1 = pad
    logit_bias: Any = struct.field(default=None, metadata={"row_ndim": 2})
    banned_token_ids: Any = struct.field(default=None, metadata={"row_ndim": 2})  # [N] | [B, N], -1 = pad
    min_new_tokens: Any = 0  # every stop id is masked until this many tokens were generated
    eos_token_id: Any = -1  # -1: no EOS; a row ends after it (as after any of stop_token_ids)
    stop_token_ids: Any = struct.field(default=None, metadata={"row_ndim": 2})  # [S] | [B, S], -1 = pad
    min_tokens_to_keep: Any = 1  # top-p, min-p and typical-p keep at least this many tokens
    num_top_tokens: int = struct.field(pytree_node=False, default=10)  # SamplingResult.top_*
    num_candidates: int = struct.field(pytree_node=False, default=128)  # fast-filter width
    # Static n-gram bans (Hugging Face's no_repeat_ngram_size / bad_words_ids); changing
    # them recompiles. See `rtdlm.sampling.no_repeat_ngram` and `bad_words`.
    no_repeat_ngram_size: int = struct.field(pytree_node=False, default=0)
    bad_words_ids: tuple = struct.field(pytree_node=False, default=())  # token-id sequences
    # Inside shard_map: the mesh axis the vocabulary is split over (see rtdlm.sharding).
    vocab_axis: str | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        # Also runs when JAX rebuilds the tree from tracers, or with None at every leaf
        # (`tree_map` placeholders): check only concrete values here; `check_complete`
        # rejects a None numeric field where a config is used.
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None and _is_concrete(value):
                object.__setattr__(self, name, _as_field_array(name, value))
        bias = self.logit_bias
        if isinstance(bias, Mapping) or (
            isinstance(bias, (list, tuple)) and bias and all(isinstance(v, Mapping) for v in bias)
        ):
            object.__setattr__(self, "logit_bias", _logit_bias(bias))
        elif bias is not None and not _stored_logit_bias(bias):
            raise TypeError(
                f"SamplingConfig.logit_bias must be a {{token_id: bias}} dict or a list of them, got {bias!r}"
            )
        for name in ("banned_token_ids", "stop_token_ids"):
            ids = getattr(self, name)
            if isinstance(ids, jax.Array) and not isinstance(ids, jax.core.Tracer):
                if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 2:
                    raise TypeError(f"SamplingConfig.{name} must be [N] or [B, N] int ids, got {ids!r}")
            elif isinstance(ids, (list, tuple, int, np.integer, np.ndarray)) and not isinstance(ids, bool):
                object.__setattr__(self, name, _ragged_ids(name, ids))
            elif ids is not None and _is_concrete(ids):
                raise TypeError(f"SamplingConfig.{name} must be token ids, got {ids!r}")
        for name in ("num_top_tokens", "num_candidates"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SamplingConfig.{name} must be a positive Python int, got {value!r}")
        _check_ngram_fields(self)

    def check_complete(self) -> None:
        """Raises `TypeError` naming a numeric field that is None (only `seed` may be):
        the decoders and `sample` call this at the Python boundary."""
        for name in _FIELDS:
            if name != "seed" and getattr(self, name) is None:
                raise TypeError(f"SamplingConfig.{name} must be a number or a [B] array of numbers, got None")

    def batch_size(self) -> int | None:
        """The B of the per-row fields (`[B]`, or `[B, N]` for the token lists), or None if
        every field is shared by all rows."""
        sizes = set()

        def add(path, leaf):
            if np.ndim(leaf) == self.row_ndim(path[0].name):
                sizes.add(np.shape(leaf)[0])

        jax.tree_util.tree_map_with_path(add, self)
        if len(sizes) > 1:
            raise ValueError(f"SamplingConfig per-row fields disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else None

    @classmethod
    def row_ndim(cls, name: str) -> int:
        """How many dimensions a field's per-row value has: 1 for `[B]` fields, 2 for the
        `[B, N]` token lists (declared on the field; a value with fewer is shared by all rows)."""
        return cls.__dataclass_fields__[name].metadata.get("row_ndim", 1)

    def stop_ids(self, batch: int) -> jax.Array:
        """[B, S] int32: every id that ends a row (`eos_token_id`, then `stop_token_ids`),
        -1 = none."""
        eos = jnp.broadcast_to(jnp.asarray(self.eos_token_id, jnp.int32), (batch,))[:, None]
        if self.stop_token_ids is None:
            return eos
        stops = jnp.asarray(self.stop_token_ids, jnp.int32)
        stops = jnp.broadcast_to(stops, (batch, stops.shape[-1]))
        return jnp.concatenate([eos, stops], axis=1)

    def repeat_rows(self, repeats: int) -> SamplingConfig:
        """The config for a batch where each row is repeated `repeats` times in a row
        (`jnp.repeat(x, repeats, axis=0)`), e.g. to process [B, T, V] logits as [B*T, V]."""
        import jax.numpy as jnp

        def expand(path, value):
            if jnp.ndim(value) != self.row_ndim(path[0].name):
                return value  # shared by every row
            return jnp.repeat(jnp.asarray(value), repeats, axis=0)

        return jax.tree_util.tree_map_with_path(expand, self)

    # ---- loaders -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingConfig:
        """Builds a config from a mapping of field names; unknown names raise `ValueError`."""
        known = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SamplingConfig field(s): {', '.join(unknown)}")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SamplingConfig:
        """Loads a config from a YAML mapping, e.g. `configs/sampling/balanced.yaml`."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{path}: expected a mapping of SamplingConfig fields")
        return cls.from_dict(values)

    @classmethod
    def from_generation_config(cls, source: Mapping[str, Any] | str | Path) -> SamplingConfig:
        """Reads a Hugging Face `generation_config.json`: a dict, the file's path, or a
        checkpoint directory that holds it.

        Missing keys take Hugging Face's defaults (notably `do_sample=False`, `top_k=50`),
        so a model's settings behave as they do in `transformers`. Keys that do not concern
        sampling (`max_length`, `pad_token_id`, ...) are ignored. A list of EOS ids (Llama 3
        has three) becomes `eos_token_id` (the first) and `stop_token_ids` (all of them):
        a row ends at any of them.
        """
        if not isinstance(source, Mapping):
            path = Path(source)
            if path.is_dir():
                path = path / "generation_config.json"
                if not path.is_file():
                    raise FileNotFoundError(f"no generation_config.json in {str(path.parent)!r}")
            source = json.loads(path.read_text())
        hf = {
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
            "min_p": None,
            "typical_p": 1.0,
            "repetition_penalty": 1.0,
            "do_sample": False,
            "eos_token_id": None,
            "min_new_tokens": None,
            "no_repeat_ngram_size": None,
            "bad_words_ids": None,
        }
        hf.update({k: v for k, v in source.items() if k in hf})
        eos = hf["eos_token_id"]
        stops = None
        if isinstance(eos, (list, tuple)):
            stops = list(eos) if len(eos) > 1 else None
            eos = eos[0] if eos else None
        return cls(
            temperature=hf["temperature"],
            top_k=hf["top_k"] or 0,
            top_p=hf["top_p"],
            min_p=hf["min_p"] or 0.0,
            typical_p=hf["typical_p"],
            repetition_penalty=hf["repetition_penalty"],
            do_sample=bool(hf["do_sample"]),
            eos_token_id=-1 if eos is None else eos,
            stop_token_ids=stops,
            min_new_tokens=hf["min_new_tokens"] or 0,
            no_repeat_ngram_size=hf["no_repeat_ngram_size"] or 0,
            bad_words_ids=hf["bad_words_ids"] or (),
        )


# ---- presets (values from the RT-DLM sampling guide; YAML copies in configs/sampling/) ----
def create_sampling_config_creative() -> SamplingConfig:
    """Creative writing, storytelling: temperature 1.2, top-p 0.95, top-k 100, penalty 1.1."""
    return SamplingConfig(temperature=1.2, top_p=0.95, top_k=100, repetition_penalty=1.1)


def create_sampling_config_precise() -> SamplingConfig:
    """Factual, precise answers: temperature 0.3, top-p 0.9, top-k 20, penalty 1.05."""
    return SamplingConfig(temperature=0.3, top_p=0.9, top_k=20, repetition_penalty=1.05)


def create_sampling_config_balanced() -> SamplingConfig:
    """General purpose: temperature 0.7, top-p 0.9, top-k 50, no penalty."""
    return SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0)


def create_sampling_config_deterministic() -> SamplingConfig:
    """Greedy decoding: temperature 0, do_sample=False."""
    return SamplingConfig(temperature=0.0, do_sample=False)


PRESETS = {
    "creative": create_sampling_config_creative,
    "precise": create_sampling_config_precise,
    "balanced": create_sampling_config_balanced,
    "deterministic": create_sampling_config_deterministic,
}
