"""A decoder-only Flax NNX transformer with a KV cache and early exit.

One implementation serves two uses: the small byte-level reference model of the
examples, the CLI and the benchmarks (the config defaults), and Hugging Face
Llama / Mistral / Qwen2 checkpoints (`rtdlm.models.from_pretrained` fills the
same config from their `config.json`). It implements the model contract of
`rtdlm.decoding`::

    model(tokens[B, T] int32, positions[B, T] int32, cache, exit_layer=None)
        -> (logits[B, T, V] float32, cache)
    model.init_cache(batch_size, max_length) -> cache
    model.prefill(tokens, positions, cache) -> (logits, cache)   # optional: a fresh cache

`prefill` is the call for a prompt at positions 0.. on a fresh cache: there the cache holds
nothing the queries may see, so attention reads only the call's own tokens, not W + T - 1
cache slots (a third less prefill time at B=16, T=384); every decoder uses it.

Architecture: token embedding -> `num_layers` pre-norm blocks (RMSNorm, causal
grouped-query attention with rotary position embeddings, RMSNorm, SwiGLU or
GELU MLP) -> final RMSNorm -> head (tied to the embedding or not). The final norm
and head are shared by every exit, so `exit_layer=E` reads the residual stream
after the first E blocks (LayerSkip-style early exit).

KV cache: a tuple over layers of `(keys [B*Hkv, Dh, S], values [B*Hkv, S, Dh])`
(batch and key/value heads merged, keys transposed: the layouts the attention matmuls read
as they are, so the decode step updates the cache in place and never copies it).
A call writes row b's token t into slot `positions[b, t]` (per row, so rows may sit
at different positions) and a query at position p attends to slots `<= p`
only (and, with a sliding `attention_window` W, to slots `> p - W`). Slots
beyond a row's position are ignored and later overwritten, so rolling back
rejected speculative tokens is just passing smaller positions on the next
call. Writes at positions `>= S` are dropped, so the cache must have at least
as many slots as the largest position + 1. With a window, a call reads only
the W + T - 1 slots its queries can see (a per-row dynamic slice), so a decode
step costs the same at any cache length; this needs each row's positions in
one call to lie within T consecutive positions (max - min <= T - 1), as every
prefill, decode step and verification block does.

Positions: in the bundled models rotary embeddings are relative and the
attention window equals the training sequence length, so there is no hard
positional limit (`max_length` is None): a query at any position sees the last
W tokens, as in training. The cache size is the caller's choice. A loaded
checkpoint's `max_length` is its `max_position_embeddings`.

Vocabulary (bundled models): the 256 byte values (see `rtdlm.models.data`);
byte 0 (NUL, which never occurs in Python source) separates documents and
serves as BOS/EOS.

NNX modules are JAX pytrees in this Flax version: pass the model to `jax.jit`
as an ordinary argument (its arrays are traced); the Python ints on it
(`num_layers`, `vocab_size`, `max_length`) are static metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# One layer's cache entry: (keys [B*H, Dh, S], values [B*H, S, Dh]).
LayerCache = tuple[jax.Array, jax.Array]
Cache = tuple[LayerCache, ...]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaled rotary frequencies for contexts longer than pretraining (Hugging Face's
    `rope_scaling`; frozen, hashable).

    Attributes:
      kind: "linear" (every frequency divided by `factor`) or "llama3" (low frequencies
        divided by `factor`, high ones kept, a smooth blend between; Llama 3.1+).
      factor: the context extension factor.
      low_freq_factor, high_freq_factor, original_max_length: "llama3" only; wavelengths
        above original_max_length / low_freq_factor are scaled, those below
        original_max_length / high_freq_factor kept.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_length: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling kind must be 'linear' or 'llama3', got {self.kind!r}")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of `Transformer` (frozen, hashable: static metadata).

    The defaults are the bundled byte model's; `rtdlm.models.from_pretrained` fills the same
    fields from a Hugging Face Llama / Mistral / Qwen2 `config.json`.

    Attributes:
      vocab_size: number of token ids (256: one per byte).
      d_model: width of the residual stream.
      num_layers: number of transformer blocks.
      num_heads: query heads.
      mlp_dim: hidden width of the MLP (per branch for SwiGLU).
      mlp_type: "swiglu" or "gelu".
      tie_embeddings: if True the head is the transposed embedding matrix.
      attention_window: a query at position p attends to positions
        p - attention_window + 1 .. p (a sliding window; None: all earlier
        positions). Set to the training sequence length, it makes every query
        at inference see the same relative distances it saw in training, so
        generation may run past the trained length.
      max_length: the largest number of positions supported, or None for no
        limit (rotary embeddings + a sliding window have none; the caller
        picks the cache size).
      rope_base: base of the rotary frequencies.
      norm_eps: epsilon of every RMSNorm.
      dtype: parameter, activation and cache dtype ("float32" by default).
      num_kv_heads: key/value heads (grouped-query attention: each serves
        num_heads // num_kv_heads query heads); None: num_heads.
      head_dim: width of a head; None: d_model // num_heads.
      qkv_bias: whether the query, key and value projections have biases (Qwen2).
      rope_scaling: a `RopeScaling` (or its dict), or None.
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 8
    num_heads: int = 4
    mlp_dim: int = 704
    mlp_type: str = "swiglu"
    tie_embeddings: bool = False
    attention_window: int | None = 256
    max_length: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        # Fill in the derived defaults, so every user reads plain ints (frozen: setattr).
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embedding), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.mlp_type not in ("swiglu", "gelu"):
            raise ValueError(f"mlp_type must be 'swiglu' or 'gelu', got {self.mlp_type!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim",
                     "attention_window", "max_length", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is None and name in ("attention_window", "max_length"):
                continue
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary inverse frequencies base^(-2i/Dh), i < Dh/2, [Dh/2] float32, as Hugging Face
    computes them (including its "linear" and "llama3" rescaling); computed in float64."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: long wavelengths scaled by 1/factor, short ones kept, a linear blend between.
    low_freq_wavelen = scaling.original_max_length / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_length / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_length / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary_embedding(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + Dh/2]) by angle position * inv_freq[i]
    (Hugging Face's `rotate_half` convention).

    Args:
      x: [B, T, H, Dh] queries or keys.
      positions: [B, T] int positions.
      inv_freq: [Dh/2] float32 from `rope_frequencies` (an array or a sequence).
    """
    half = x.shape[-1] // 2
    inv_freq = jnp.asarray(np.asarray(inv_freq, np.float32))  # [Dh/2]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Causal self-attention with RoPE, grouped-query heads and an optional KV cache."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, config.jnp_dtype
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        # A tuple of Python floats: static metadata of the module, not a traced array.
        inv_freq = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling)
        self.inv_freq = tuple(inv_freq.tolist())
        self.window = config.attention_window
        # One fused projection for q, k, v: fewer, larger matmuls. Columns: q | k | v.
        width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv = nnx.Linear(
            d, width, use_bias=config.qkv_bias, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        # Output projection scaled down so the residual stream starts small.
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * config.num_layers))
        self.out = nnx.Linear(
            config.num_heads * config.head_dim, d, use_bias=False, kernel_init=out_init,
            dtype=dtype, param_dtype=dtype, rngs=rngs,
        )

    def _mask(self, query_positions, key_positions, scores):
        """Scales and masks raw scores [B, H, T, K] -> float32: a query at position p sees keys
        at positions <= p and, with a window W, > p - W; the others get the float32 minimum."""
        offsets = query_positions[:, :, None] - key_positions[:, None, :]  # [B, T, K]
        mask = offsets >= 0
        if self.window is not None:
            mask &= offsets < self.window
        scores = scores.astype(jnp.float32) / math.sqrt(self.head_dim)
        return jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)

    def _write_cache(self, cache: LayerCache, k, v, positions) -> LayerCache:
        """Writes row b's token t (k, v: [B, T, Hkv, Dh]) into slot positions[b, t].

        The cache holds keys [B*Hkv, Dh, S] and values [B*Hkv, S, Dh]: the layouts both attention
        matmuls read as they are. The write is a scatter into that merged layout (a
        dynamic-update-slice at B=1), so XLA updates the cache in place, touching only the T
        written slots: a select over every slot, or a scatter through a reshaped view, would
        cost O(S) per step (the view makes XLA copy the cache). Writes at slots >= S are
        dropped.
        """
        cache_k, cache_v = cache
        batch, length, heads, head_dim = k.shape
        rows = jnp.arange(batch * heads)[:, None]  # [N, 1], broadcasts against [N, T]
        slots = jnp.repeat(positions, heads, axis=0)  # [N, T]
        new_k = k.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)  # [N, T, Dh]
        new_v = v.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)
        # The advanced indices (rows, slots) come first in the update: [N, T, Dh] for both.
        keys = cache_k.at[rows, :, slots].set(new_k.astype(cache_k.dtype), mode="drop")
        values = cache_v.at[rows, slots].set(new_v.astype(cache_v.dtype), mode="drop")
        return keys, values

    def _visible_slots(self, cache: LayerCache, positions):
        """The cache slots a call's queries may attend to: keys [N, Dh, W'], values [N, W', Dh]
        and their slot numbers [B, W'].

        Without a window that is the whole cache (W' = S). With a window W, row b's queries
        (at most T consecutive positions ending at m = max_t positions[b, t]) see only slots
        m - W - T + 2 .. m, so each row reads W' = W + T - 1 slots from where its window
        starts: a decode step costs the same at any cache length.
        """
        cache_k, cache_v = cache
        num_slots = cache_v.shape[1]
        batch = positions.shape[0]
        span = num_slots if self.window is None else min(num_slots, self.window + positions.shape[1] - 1)
        if span == num_slots:
            return cache_k, cache_v, jnp.broadcast_to(jnp.arange(num_slots), (batch, num_slots))
        # Clipped into the cache: positions >= S (writes dropped) see the last W' slots.
        first = jnp.clip(jnp.max(positions, axis=1) - span + 1, 0, num_slots - span)  # [B]
        rows_k = cache_k.reshape(batch, -1, *cache_k.shape[1:])  # [B, Hkv, Dh, S]
        rows_v = cache_v.reshape(batch, -1, *cache_v.shape[1:])  # [B, Hkv, S, Dh]
        keys = jax.vmap(lambda c, f: jax.lax.dynamic_slice_in_dim(c, f, span, axis=2))(rows_k, first)
        values = jax.vmap(lambda c, f: jax.lax.dynamic_slice_in_dim(c, f, span, axis=1))(rows_v, first)
        slots = first[:, None] + jnp.arange(span)[None]  # [B, W']
        return (keys.reshape(-1, *keys.shape[2:]), values.reshape(-1, *values.shape[2:]), slots)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerCache | None, fresh_cache: bool = False
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, D]; positions: [B, T]; cache: ([B*Hkv, Dh, S], [B*Hkv, S, Dh]) or None.

        fresh_cache (static): the cache holds nothing this call's queries may see (a prefill
        from position 0), so they attend to the call's own T keys instead of W + T - 1 slots.
        """
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        group = heads // kv_heads  # query heads per key/value head
        q, k, v = jnp.split(self.qkv(x), [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
        q = rotary_embedding(q.reshape(batch, length, heads, head_dim), positions, self.inv_freq)
        k = rotary_embedding(k.reshape(batch, length, kv_heads, head_dim), positions, self.inv_freq)
        v = v.reshape(batch, length, kv_heads, head_dim)  # q: [B, T, H, Dh]; k, v: [B, T, Hkv, Dh]

        if cache is not None:
            cache = self._write_cache(cache, k, v, positions)
        if cache is None or fresh_cache:
            # Attend to this call's own tokens, by position (training, or a prefill: its keys
            # read rounded as the cache stores them). Query head h reads key/value head h // group.
            if cache is not None:
                k, v = (new.astype(c.dtype).astype(new.dtype) for new, c in zip((k, v), cache, strict=True))
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # [B, T, H, Dh]
            scores = self._mask(positions, positions, jnp.einsum("bthd,bshd->bhts", q, k))
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, H, T, T]
            attended = jnp.einsum("bhts,bshd->bthd", probs, v)  # [B, T, H, Dh]
        else:
            keys, values, slots = self._visible_slots(cache, positions)  # [N, Dh, W'], [N, W', Dh], [B, W']
            span = slots.shape[1]
            # Batch and key/value heads merged into N = B*Hkv, the cache's own layout; the
            # `group` query heads of a key/value head are rows of one matmul: [N, G*T, Dh].
            q_n = q.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
            q_n = q_n.reshape(batch * kv_heads, group * length, head_dim)
            scores = jnp.einsum("ntd,nds->nts", q_n, keys.astype(q.dtype))  # [N, G*T, W']
            scores = self._mask(positions, slots, scores.reshape(batch, heads, length, span))
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, H, T, W']
            attended = jnp.einsum(
                "nts,nsd->ntd", probs.reshape(batch * kv_heads, group * length, span),
                values.astype(v.dtype),
            )  # [N, G*T, Dh]
            attended = attended.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)
        return self.out(attended.reshape(batch, length, heads * head_dim)), cache  # [B, T, D]


class MLP(nnx.Module):
    """SwiGLU (silu(x W_gate) * x W_up) W_down, or GELU (gelu(x W_up)) W_down."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, f, dtype = config.d_model, config.mlp_dim, config.jnp_dtype
        self.gated = config.mlp_type == "swiglu"
        # For SwiGLU gate and up projections are fused into one [D, 2F] matmul.
        width = 2 * f if self.gated else f
        self.up = nnx.Linear(d, width, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * config.num_layers))
        self.down = nnx.Linear(
            f, d, use_bias=False, kernel_init=out_init, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)  # [B, T, 2F] or [B, T, F]
        if self.gated:
            gate, up = jnp.split(h, 2, axis=-1)  # [B, T, F] each
            h = jax.nn.silu(gate) * up
        else:
            h = jax.nn.gelu(h)
        return self.down(h)  # [B, T, D]


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, dtype, eps = config.d_model, config.jnp_dtype, config.norm_eps
        self.attn_norm = nnx.RMSNorm(d, epsilon=eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d, epsilon=eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerCache | None, fresh_cache: bool = False
    ) -> tuple[jax.Array, LayerCache | None]:
        attended, cache = self.attn(self.attn_norm(x), positions, cache, fresh_cache)
        x = x + attended  # [B, T, D]
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class Transformer(nnx.Module):
    """Decoder-only transformer implementing the rtdlm model contract.

    Example:
      >>> model = Transformer(TransformerConfig(d_model=64, num_layers=2, num_heads=2,
      ...                                       mlp_dim=128), rngs=nnx.Rngs(0))
      >>> cache = model.init_cache(batch_size=1, max_length=16)
      >>> tokens = jnp.array([[104, 105]], jnp.int32)
      >>> positions = jnp.array([[0, 1]], jnp.int32)
      >>> logits, cache = jax.jit(lambda m, t, p, c: m(t, p, c))(model, tokens, positions, cache)
      >>> logits.shape
      (1, 2, 256)
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.num_layers = config.num_layers
        self.vocab_size = config.vocab_size
        self.max_length = config.max_length
        dtype = config.jnp_dtype
        self.embedding = nnx.Embed(
            config.vocab_size,
            config.d_model,
            embedding_init=nnx.initializers.normal(1.0),
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.RMSNorm(
            config.d_model, epsilon=config.norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        if config.tie_embeddings:
            self.head = None
        else:
            # Zero-initialised head: the untrained model predicts uniform bytes.
            self.head = nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.zeros_init(),
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )

    # -- the three stages; __call__ composes them so there is one code path --

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> hidden [B, T, D]."""
        return self.embedding(tokens)

    def run_layers(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        cache: Cache | None,
        start_layer: int,
        stop_layer: int,
        fresh_cache: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        """Applies blocks start_layer .. stop_layer-1, writing their cache entries.

        Args:
          hidden: [B, T, D] residual stream entering block `start_layer`.
          positions: [B, T] int32 positions of the tokens.
          cache: the whole model's cache (a tuple over all layers) or None.
          start_layer, stop_layer: Python ints, 0 <= start <= stop <= num_layers.
          fresh_cache: Python bool; True only when every row starts at position 0 on a cache
            that holds nothing yet (`prefill`): attention then reads the call's own keys.

        Returns:
          ([B, T, D] hidden after block stop_layer-1, cache with those layers updated).
        """
        if not 0 <= start_layer <= stop_layer <= self.num_layers:
            raise ValueError(
                f"need 0 <= start_layer <= stop_layer <= num_layers={self.num_layers}, "
                f"got start_layer={start_layer}, stop_layer={stop_layer}"
            )
        new_cache = None if cache is None else list(cache)
        for layer in range(start_layer, stop_layer):
            layer_cache = None if cache is None else cache[layer]
            hidden, layer_cache = self.blocks[layer](hidden, positions, layer_cache, fresh_cache)
            if new_cache is not None:
                new_cache[layer] = layer_cache
        return hidden, (None if new_cache is None else tuple(new_cache))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Shared final norm + head: hidden [B, T, D] -> logits [B, T, V] float32."""
        normed = self.final_norm(hidden)
        out = self.embedding.attend(normed) if self.head is None else self.head(normed)
        return out.astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Cache | None,
        exit_layer: int | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Runs the first `exit_layer` (default: all) blocks and the shared head.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int positions; keys/values are written at these slots.
          cache: from `init_cache`, or None to attend only within this call
            (training on full sequences).
          exit_layer: Python int in 1..num_layers, or None for num_layers.
            Only layers < exit_layer write their cache entries.

        Returns:
          (logits [B, T, V] float32, updated cache).
        """
        return self._forward(tokens, positions, cache, exit_layer, fresh_cache=False)

    def prefill(self, tokens: jax.Array, positions: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """`__call__` for rows that start at position 0 on a cache that holds nothing yet:
        the same logits and cache, with attention over the call's own T keys only."""
        return self._forward(tokens, positions, cache, None, fresh_cache=True)

    def _forward(self, tokens, positions, cache, exit_layer, fresh_cache):
        stop = self.num_layers if exit_layer is None else self._check_exit_layer(exit_layer)
        tokens = jnp.asarray(tokens)
        positions = jnp.asarray(positions)
        if tokens.ndim != 2 or positions.shape != tokens.shape:
            raise ValueError(
                f"tokens and positions must both be [B, T]; got {tokens.shape} and "
                f"{positions.shape}"
            )
        hidden = self.embed(tokens)  # [B, T, D]
        hidden, cache = self.run_layers(hidden, positions, cache, 0, stop, fresh_cache)
        return self.logits(hidden), cache

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """Zero KV cache: a tuple over layers of (keys [B*Hkv, Dh, S], values [B*Hkv, S, Dh])."""
        rows, head_dim = batch_size * self.config.num_kv_heads, self.config.head_dim
        keys, values = (rows, head_dim, max_length), (rows, max_length, head_dim)
        dtype = self.config.jnp_dtype
        return tuple(
            (jnp.zeros(keys, dtype), jnp.zeros(values, dtype)) for _ in range(self.num_layers)
        )

    def reorder_cache(self, cache: Cache, indices: jax.Array) -> Cache:
        """Row i of the new cache is row `indices[i]` ([B'] int32) of `cache` (beam search).
        The leaves merge batch and key/value heads, [B*Hkv, ...]: gathered per row."""
        heads = self.config.num_kv_heads

        def gather(leaf):  # [B*Hkv, ...] -> [B'*Hkv, ...]
            rows = leaf.reshape(-1, heads, *leaf.shape[1:])[indices]
            return rows.reshape(-1, *leaf.shape[1:])

        return jax.tree.map(gather, cache)

    def _check_exit_layer(self, exit_layer: Any) -> int:
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, (int, np.integer)):
            raise TypeError(f"exit_layer must be a Python int or None, got {type(exit_layer)}")
        if not 1 <= int(exit_layer) <= self.num_layers:
            raise ValueError(f"exit_layer must be in 1..{self.num_layers}, got {exit_layer}")
        return int(exit_layer)


# ----------------------------------------------------------------------------
# Construction, saving and loading.

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_SUFFIX = ".msgpack"


def load_config(config: TransformerConfig | Mapping[str, Any] | str | os.PathLike) -> dict:
    """Returns a config as a dict; accepts a dataclass, a mapping or a YAML/JSON path."""
    if isinstance(config, TransformerConfig):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        import yaml

        return yaml.safe_load(f)


def create_model(
    config: TransformerConfig | Mapping[str, Any] | str | os.PathLike,
    rngs: nnx.Rngs | int = 0,
) -> Transformer:
    """Builds a freshly initialised `Transformer`.

    Args:
      config: a `TransformerConfig`, a dict of its fields, or a path to a YAML
        (or JSON) file; a file or dict with a top-level "model" key (the
        training configs in `configs/models/`) uses that section.
      rngs: `nnx.Rngs` or an int seed.
    """
    values = load_config(config)
    if "model" in values and isinstance(values["model"], Mapping):
        values = values["model"]
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    return Transformer(TransformerConfig.from_dict(values), rngs=rngs)


def param_count(model: Transformer) -> int:
    """Number of parameters (scalars) in the model."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def widen_mlp(model: Transformer, mlp_dim: int) -> Transformer:
    """The same function with a wider MLP: extra hidden units whose weights are all zero.

    Every block's gate and up projections gain zero columns and its down projection zero
    rows, so the extra units output act(0) * 0 = 0 and the logits stay the model's (up to
    the float rounding of a longer matmul), while every step reads the wider weights. The
    speculative benchmark uses it to turn the small bundled target into a memory-bound one
    with the same acceptance rates (`benchmarks/speculative.py --memory-bound`).
    """
    config = model.config
    if mlp_dim < config.mlp_dim:
        raise ValueError(f"mlp_dim must be >= the model's ({config.mlp_dim}), got {mlp_dim}")
    extra = mlp_dim - config.mlp_dim
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for block in params["blocks"].values():
        up, down = block["mlp"]["up"]["kernel"], block["mlp"]["down"]["kernel"]  # [D, 2F], [F, D]
        new_columns = jnp.zeros((up.shape[0], extra), up.dtype)
        parts = jnp.split(up, 2, axis=1) if config.mlp_type == "swiglu" else [up]  # gate | up
        block["mlp"]["up"]["kernel"] = jnp.concatenate(
            [x for part in parts for x in (part, new_columns)], axis=1
        )
        new_rows = jnp.zeros((extra, down.shape[1]), down.dtype)
        block["mlp"]["down"]["kernel"] = jnp.concatenate([down, new_rows])
    wide_config = dataclasses.replace(config, mlp_dim=mlp_dim)
    wide = nnx.eval_shape(lambda: Transformer(wide_config, rngs=nnx.Rngs(0)))
    state = nnx.state(wide, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(wide, state)
    return wide


def model_to_bytes(model: Transformer, dtype: str | None = "float16", metadata=None) -> bytes:
    """Serialises config + parameters (+ optional metadata) into one msgpack blob.

    Args:
      dtype: dtype the parameters are stored in ("float16" halves the file;
        `model_from_bytes` casts back to the config's dtype), or None to keep it.
    """
    from flax import serialization

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    store = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x, dtype))
    payload = {
        "format": "rtdlm-transformer-v1",
        "config": model.config.to_dict(),
        "params": jax.tree.map(store, params),
        "metadata": json.dumps(metadata or {}),
    }
    return serialization.msgpack_serialize(payload)


def model_from_bytes(data: bytes) -> tuple[Transformer, dict]:
    """Inverse of `model_to_bytes`: returns (model, metadata dict)."""
    from flax import serialization

    payload = serialization.msgpack_restore(data)
    if payload.get("format") != "rtdlm-transformer-v1":
        raise ValueError("not an rtdlm transformer checkpoint (missing format tag)")
    # Build on abstract shapes (no random init), then fill in the stored parameters.
    config = TransformerConfig.from_dict(payload["config"])
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    dtype = config.jnp_dtype
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), payload["params"]))
    nnx.update(model, state)
    return model, json.loads(payload.get("metadata") or "{}")


def save_model(model: Transformer, path: str | os.PathLike, dtype: str | None = "float16",
               metadata=None) -> None:
    """Writes `model_to_bytes(model, dtype, metadata)` to `path` (atomically)."""
    data = model_to_bytes(model, dtype=dtype, metadata=metadata)
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # write then rename: readers never see a partial file
        f.write(data)
    os.replace(tmp, path)


def bundled_models() -> list[str]:
    """Names of the models bundled in `rtdlm/models/weights/` (e.g. ["draft", "target"])."""
    if not os.path.isdir(WEIGHTS_DIR):
        return []
    return sorted(
        name[: -len(WEIGHTS_SUFFIX)]
        for name in os.listdir(WEIGHTS_DIR)
        if name.endswith(WEIGHTS_SUFFIX)
    )


def load_model(name_or_path: str | os.PathLike = "target", *, with_metadata: bool = False):
    """Loads a bundled model by name ("target", "draft") or a checkpoint file path.

    Parameters stored as float16 are cast to the config's dtype (float32).

    Returns:
      The `Transformer`, or `(Transformer, metadata)` if `with_metadata`.
    """
    path = os.fspath(name_or_path)
    if not os.path.exists(path):
        bundled = os.path.join(WEIGHTS_DIR, path + WEIGHTS_SUFFIX)
        if not os.path.exists(bundled):
            raise FileNotFoundError(
                f"no checkpoint file {path!r} and no bundled model of that name; bundled "
                f"models: {bundled_models()}"
            )
        path = bundled
    with open(path, "rb") as f:
        model, metadata = model_from_bytes(f.read())
    return (model, metadata) if with_metadata else model
