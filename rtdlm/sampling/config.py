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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
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
    "do_sample": (np.bool_, lambda v: None),
    "seed": (np.uint32, lambda v: None if 0 <= v < 2**32 else "must be in [0, 2**32)"),
    "min_new_tokens": (np.int32, lambda v: None if v >= 0 else "must be >= 0"),
    "eos_token_id": (np.int32, lambda v: None if v >= -1 else "must be a token id or -1 (none)"),
}


def _is_concrete(value: Any) -> bool:
    """True for values we can check on the host (not tracers, not JAX's placeholders)."""
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(value, (bool, int, float, str, list, tuple, np.ndarray, np.generic, jax.Array))


def _as_field_array(name: str, value: Any) -> np.ndarray:
    dtype, check = _FIELDS[name]
    raw = np.asarray(value)
    if raw.dtype == object or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        raise TypeError(f"SamplingConfig.{name} must be numeric, got {value!r}")
    if raw.ndim > 1:
        raise ValueError(f"SamplingConfig.{name} must be a scalar or a [B] array, got shape {raw.shape}")
    if np.issubdtype(raw.dtype, np.floating) and np.isnan(raw).any():
        raise ValueError(f"SamplingConfig.{name} must not be NaN")
    if (
        np.issubdtype(dtype, np.integer)
        and np.issubdtype(raw.dtype, np.floating)
        and not (np.all(np.isfinite(raw)) and np.all(raw == np.round(raw)))
    ):
        raise ValueError(f"SamplingConfig.{name} must be an integer, got {value!r}")
    if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(raw)):
        raise ValueError(f"SamplingConfig.{name} must be finite, got {value!r}")
    for v in raw.reshape(-1).tolist():
        problem = check(v)
        if problem:
            raise ValueError(f"SamplingConfig.{name} {problem}, got {v!r}")
    return raw.astype(dtype)


def _ragged_ids(name: str, ids: Any) -> np.ndarray:
    """Token ids as `[N]` or, for a list of per-row lists, `[B, N]` padded with -1."""
    if isinstance(ids, (np.ndarray, int, np.integer)):
        arr = np.asarray(ids)
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 2:
            raise ValueError(f"SamplingConfig.{name} must be integer ids, [N] or [B, N], got {ids!r}")
        arr = arr.reshape(-1) if arr.ndim == 0 else arr
    elif ids and isinstance(ids[0], (list, tuple, np.ndarray)):
        width = max(len(row) for row in ids)
        out = np.full((len(ids), max(width, 1)), -1, np.int32)
        for b, row in enumerate(ids):
            out[b, : len(row)] = row
        arr = out
    else:
        arr = np.asarray(ids, np.int64).reshape(-1)
    if arr.size and arr.min() < -1:
        raise ValueError(f"SamplingConfig.{name} holds a negative token id")
    return arr.astype(np.int32)


def _logit_bias(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """{token: bias} (or a list of such dicts, one per row) -> (ids, biases), -1 padded."""
    if isinstance(value, Mapping):
        value = [value]
        squeeze = True
    elif isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value):
        squeeze = False
    else:
        raise TypeError("SamplingConfig.logit_bias must be a {token_id: bias} dict or a list of them")
    width = max(1, max(len(d) for d in value))
    ids = np.full((len(value), width), -1, np.int32)
    biases = np.zeros((len(value), width), np.float32)
    for b, row in enumerate(value):
        for j, (token, bias) in enumerate(row.items()):
            if int(token) < 0:
                raise ValueError(f"SamplingConfig.logit_bias has a negative token id {token}")
            if not math.isfinite(float(bias)):
                raise ValueError(f"SamplingConfig.logit_bias[{token}] must be finite")
            ids[b, j], biases[b, j] = int(token), float(bias)
    return (ids[0], biases[0]) if squeeze else (ids, biases)


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
    logit_bias: Any = None  # {token: bias}; stored as (ids [N] | [B, N], biases), ids -1 = pad
    banned_token_ids: Any = None  # [N] or [B, N] int, -1 = pad
    min_new_tokens: Any = 0  # EOS is masked until this many tokens were generated
    eos_token_id: Any = -1  # -1: no EOS (used by min_new_tokens)
    num_top_tokens: int = struct.field(pytree_node=False, default=10)  # SamplingResult.top_*
    num_candidates: int = struct.field(pytree_node=False, default=128)  # fast-filter width
    # Inside shard_map: the mesh axis the vocabulary is split over (see rtdlm.sharding).
    vocab_axis: str | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        # Also runs when JAX rebuilds the tree from tracers: check only concrete values.
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None and _is_concrete(value):
                object.__setattr__(self, name, _as_field_array(name, value))
        bias = self.logit_bias
        if isinstance(bias, Mapping) or (
            isinstance(bias, (list, tuple)) and bias and all(isinstance(v, Mapping) for v in bias)
        ):
            object.__setattr__(self, "logit_bias", _logit_bias(bias))
        elif bias is not None and not (isinstance(bias, tuple) and len(bias) == 2):
            # (ids, biases) arrays, as stored, pass through (JAX rebuilds trees with them)
            raise TypeError(f"SamplingConfig.logit_bias must be a {{token_id: bias}} dict, got {bias!r}")
        banned = self.banned_token_ids
        if isinstance(banned, (list, tuple, int, np.integer, np.ndarray)) and not isinstance(banned, bool):
            object.__setattr__(self, "banned_token_ids", _ragged_ids("banned_token_ids", banned))
        elif banned is not None and _is_concrete(banned) and not isinstance(banned, jax.Array):
            raise TypeError(f"SamplingConfig.banned_token_ids must be token ids, got {banned!r}")
        for name in ("num_top_tokens", "num_candidates"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SamplingConfig.{name} must be a positive Python int, got {value!r}")

    def batch_size(self) -> int | None:
        """The B of the `[B]` fields, or None if every field is a scalar."""
        sizes = {np.shape(leaf)[0] for leaf in self._row_leaves() if np.ndim(leaf) == 1}
        if len(sizes) > 1:
            raise ValueError(f"SamplingConfig per-row fields disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else None

    def repeat_rows(self, repeats: int) -> SamplingConfig:
        """The config for a batch where each row is repeated `repeats` times in a row
        (`jnp.repeat(x, repeats, axis=0)`), e.g. to process [B, T, V] logits as [B*T, V]."""
        import jax.numpy as jnp

        def expand(value, per_row_ndim):
            if value is None or jnp.ndim(value) != per_row_ndim:
                return value  # shared by every row
            return jnp.repeat(jnp.asarray(value), repeats, axis=0)

        updates = {name: expand(getattr(self, name), 1) for name in _FIELDS}
        updates["banned_token_ids"] = expand(self.banned_token_ids, 2)
        if self.logit_bias is not None:
            updates["logit_bias"] = tuple(expand(v, 2) for v in self.logit_bias)
        return self.replace(**updates)

    def _row_leaves(self):
        return [getattr(self, name) for name in _FIELDS if getattr(self, name) is not None]

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
        """Reads a Hugging Face `generation_config.json` (a dict or a path).

        Missing keys take Hugging Face's defaults (notably `do_sample=False`, `top_k=50`),
        so a model's settings behave as they do in `transformers`. Keys that do not concern
        sampling (`max_length`, `pad_token_id`, ...) are ignored. A list of EOS ids keeps the
        first one.
        """
        if not isinstance(source, Mapping):
            source = json.loads(Path(source).read_text())
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
        }
        hf.update({k: v for k, v in source.items() if k in hf})
        eos = hf["eos_token_id"]
        if isinstance(eos, (list, tuple)):
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
            min_new_tokens=hf["min_new_tokens"] or 0,
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
