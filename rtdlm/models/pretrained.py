"""Local Hugging Face Llama-family checkpoints as `Transformer`s, and their tokenizers::

    from rtdlm.models import from_pretrained, load_tokenizer
    model = from_pretrained("path/to/Llama-3.2-1B")      # config.json + *.safetensors
    tokenizer = load_tokenizer("path/to/Llama-3.2-1B")   # tokenizer.json
    prompt = tokenizer.encode("def fibonacci(n):")[None] # [1, P] int32

The checkpoint becomes a configuration of the one transformer in
`rtdlm.models.transformer` (RMSNorm, rotary, grouped-query attention, SwiGLU), so it
follows the model contract (positions-indexed KV cache, `exit_layer`, `embed` /
`run_layers` / `logits` for self-speculative decoding). Supported: `model_type` "llama"
(Llama 2/3, grouped-query attention, `rope_theta`, "linear" and "llama3" rope scaling),
"mistral" (sliding window) and "qwen2" (q/k/v biases, tied embeddings). Anything else a
config asks for that this model does not compute raises a `ValueError` naming it. Only
local paths are read: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtdlm.models.transformer import _DTYPES, RopeScaling, Transformer, TransformerConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _checkpoint_dir(path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {str(directory)!r}")
    return directory


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5's `rope_parameters` or 4's `rope_theta` +
    `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not params:
        params = dict(hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_length=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def config_from_hf(hf: Mapping[str, Any], dtype: str | None = None) -> TransformerConfig:
    """The `TransformerConfig` of a Hugging Face Llama / Mistral / Qwen2 `config.json` dict.

    Args:
      hf: the parsed config.json.
      dtype: "float32", "bfloat16" or "float16"; None: the checkpoint's own `dtype`
        (`torch_dtype` in transformers 4), float32 if it names none of those.

    Raises:
      ValueError: naming the unsupported `model_type` or option.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") not in ("silu", "swish"),
        "attention_bias": model_type == "llama" and bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "use_sliding_window": model_type == "qwen2" and bool(hf.get("use_sliding_window")),
        # One attention kind for every layer: full, or (Mistral) all sliding.
        "layer_types": bool(set(hf.get("layer_types") or ()) - {"full_attention"})
        and set(hf["layer_types"]) != {"sliding_attention"},
        "quantization_config": bool(hf.get("quantization_config")),
    }
    for option, bad in unsupported.items():
        if bad:
            raise ValueError(f"{model_type} option {option}={hf.get(option)!r} is not supported")
    rope_base, rope_scaling = _rope(hf)
    if dtype is None:
        stored = hf.get("dtype", hf.get("torch_dtype"))
        dtype = stored if stored in _DTYPES else "float32"
    try:
        dtype = jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    heads = int(hf["num_attention_heads"])
    window = hf.get("sliding_window") if model_type == "mistral" else None
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        mlp_dim=int(hf["intermediate_size"]),
        mlp_type="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_window=None if window is None else int(window),
        max_length=int(hf["max_position_embeddings"]) if hf.get("max_position_embeddings") else None,
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        dtype=dtype,
    )


def _weight_files(directory: Path) -> list[Path]:
    if (directory / SAFETENSORS_FILE).is_file():
        return [directory / SAFETENSORS_FILE]
    if (directory / SAFETENSORS_INDEX).is_file():
        weight_map = _read_json(directory / SAFETENSORS_INDEX).get("weight_map", {})
        return [directory / name for name in sorted(set(weight_map.values()))]
    found = sorted(p.name for p in directory.iterdir() if p.is_file())
    raise FileNotFoundError(
        f"{directory} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} (only safetensors "
        f"checkpoints are read); files there: {found}"
    )


def _read_tensors(files: Iterable[Path]) -> dict[str, jax.Array]:
    from safetensors import safe_open

    tensors = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file} (named by the index) is missing")
        with safe_open(str(file), framework="flax") as f:  # jax arrays: bfloat16 included
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensors[name] = f.get_tensor(name)
    return tensors


def _params(config: TransformerConfig, tensors: Mapping[str, jax.Array]) -> dict:
    """Hugging Face tensor names -> the Transformer's parameter tree (fused q|k|v and gate|up,
    kernels transposed to [in, out]), cast to the config's dtype."""
    dtype = config.jnp_dtype
    used = set()

    def get(name):
        if name not in tensors:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        used.add(name)
        return tensors[name].astype(dtype)

    def kernel(*names):  # torch Linear weights [out, in] -> one [in, sum(out)] kernel
        return jnp.concatenate([get(name).T for name in names], axis=1)

    blocks = {}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        attn = layer + "self_attn."
        qkv = {"kernel": kernel(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight")}
        if config.qkv_bias:
            qkv["bias"] = jnp.concatenate([get(attn + f"{x}_proj.bias") for x in "qkv"])
        blocks[i] = {
            "attn_norm": {"scale": get(layer + "input_layernorm.weight")},
            "attn": {"qkv": qkv, "out": {"kernel": kernel(attn + "o_proj.weight")}},
            "mlp_norm": {"scale": get(layer + "post_attention_layernorm.weight")},
            "mlp": {
                "up": {"kernel": kernel(layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight")},
                "down": {"kernel": kernel(layer + "mlp.down_proj.weight")},
            },
        }
    params = {
        "embedding": {"embedding": get("model.embed_tokens.weight")},
        "blocks": blocks,
        "final_norm": {"scale": get("model.norm.weight")},
    }
    if not config.tie_embeddings:
        params["head"] = {"kernel": kernel("lm_head.weight")}
    # Rotary tables some exports store are recomputed here; a tied head's copy is unused.
    ignored = {n for n in tensors if n.endswith("rotary_emb.inv_freq") or n == "lm_head.weight"}
    unexpected = sorted(set(tensors) - used - ignored)
    if unexpected:
        raise ValueError(f"checkpoint tensors this model does not use: {unexpected[:8]}")
    return params


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def from_pretrained(path, *, dtype=None) -> Transformer:
    """Loads a local Hugging Face Llama / Mistral / Qwen2 checkpoint directory.

    Args:
      path: a directory with `config.json` and `model.safetensors` (or sharded
        `model-*.safetensors` with `model.safetensors.index.json`).
      dtype: parameter, activation and cache dtype: "float32", "bfloat16" or "float16" (a
        string or a jnp dtype); None keeps the checkpoint's `dtype`. Weights are cast on load.

    Returns:
      A `Transformer` on the model contract: `model(tokens, positions, cache, exit_layer=None)`,
      `model.init_cache(batch, length)`, `vocab_size`, `num_layers`, `max_length`.

    Raises:
      FileNotFoundError: no directory, no config.json, or no safetensors weights.
      ValueError: an unsupported `model_type` or option (named), or tensors that do not
        match the config.

    Example:
      >>> model = from_pretrained("checkpoints/tiny-llama", dtype="bfloat16")  # doctest: +SKIP
      >>> out = generate(model, prompt, key=key, config=config, max_new_tokens=32)  # doctest: +SKIP
    """
    directory = _checkpoint_dir(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json (not a Hugging Face checkpoint)")
    config = config_from_hf(_read_json(directory / "config.json"), dtype=dtype)
    params = _params(config, _read_tensors(_weight_files(directory)))
    # Build on abstract shapes (no random init), then fill in the checkpoint's parameters.
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    expected, got = _shapes(nnx.to_pure_dict(state)), _shapes(params)
    if expected != got:
        mismatched = [f"{name}: {got.get(name)} (config: {shape})" for name, shape in expected.items()
                      if got.get(name) != shape]
        raise ValueError(f"checkpoint tensor shapes do not match config.json: {mismatched[:4]}")
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


@dataclasses.dataclass(frozen=True)
class PretrainedTokenizer:
    """A checkpoint's `tokenizer.json` (Hugging Face `tokenizers`) and its special ids.

    Attributes:
      tokenizer: the `tokenizers.Tokenizer`.
      eos_token_ids: every end-of-sequence id, from generation_config.json (else config.json).
      bos_token_id: the beginning-of-sequence id, or None.
      pad_token_id: the padding id, or None.
    """

    tokenizer: Any
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (what a single `eos_token_id=` argument takes), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
        """text -> [P] int32 token ids (with the BOS the tokenizer adds, by default)."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True):
        """texts -> (tokens [B, P] int32 right-padded, lengths [B] int32): the decoders'
        `prompt_tokens` and `prompt_lengths`."""
        rows = [self.encode(text, add_special_tokens=add_special_tokens) for text in texts]
        lengths = np.asarray([len(row) for row in rows], np.int32)
        tokens = np.full((len(rows), max(lengths, default=0)), self.pad_token_id or 0, np.int32)
        for row, ids in zip(tokens, rows, strict=True):
            row[: len(ids)] = ids
        return tokens, lengths

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Token ids (any int sequence or array) -> text."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                     skip_special_tokens=skip_special_tokens)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def load_tokenizer(path) -> PretrainedTokenizer:
    """Loads `tokenizer.json` from a checkpoint directory (or the file itself) with the
    `tokenizers` library; special ids come from generation_config.json, else config.json.

    Example:
      >>> tokenizer = load_tokenizer("checkpoints/tiny-llama")  # doctest: +SKIP
      >>> tokenizer.decode(tokenizer.encode("hello", add_special_tokens=False))  # doctest: +SKIP
      'hello'
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(file)!r}")
    directory = file.parent
    special: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):  # the latter wins
        if (directory / name).is_file():
            values = _read_json(directory / name)
            special.update({k: values[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")
                            if values.get(k) is not None})
    bos, pad = _ids(special.get("bos_token_id")), _ids(special.get("pad_token_id"))
    return PretrainedTokenizer(
        tokenizer=Tokenizer.from_file(str(file)),
        eos_token_ids=_ids(special.get("eos_token_id")),
        bos_token_id=bos[0] if bos else None,
        pad_token_id=pad[0] if pad else None,
    )
