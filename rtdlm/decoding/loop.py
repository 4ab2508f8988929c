"""`generate()`: prefill in one forward pass, then one compiled `lax.scan` over new tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from rtdlm.sampling import SamplingConfig, SamplingState, process_logits, row_keys, sample_processed
from rtdlm.sampling.processors import token_counts
from rtdlm.sharding import sharded_sample

StreamCallback = Callable[[np.ndarray, np.ndarray], Any]  # (step, tokens [B]) on the host


@struct.dataclass
class GenerationOutput:
    """New tokens only. After a row's EOS the rest of its row is `pad_token_id`."""

    tokens: jax.Array  # [B, max_new_tokens] int32
    lengths: jax.Array  # [B] new tokens per row, the EOS included
    num_drafted: jax.Array | None = None  # [B] speculative only: draft tokens proposed
    num_accepted: jax.Array | None = None  # [B] speculative only: draft tokens accepted


def check_generation_args(model, prompt_tokens, prompt_lengths, max_new_tokens, config, extra_slots=0):
    """Python-side checks shared by every decoder. Returns (prompt [B, P], lengths [B], cache length)."""
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be [B, P] with P >= 1, got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt_tokens must be integer token ids, got {prompt.dtype}")
    batch, prompt_len = prompt.shape
    if prompt_lengths is None:
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
    else:
        lengths = jnp.asarray(prompt_lengths, jnp.int32)
        if lengths.shape != (batch,):
            raise ValueError(f"prompt_lengths must have shape ({batch},), got {lengths.shape}")
        if not isinstance(lengths, jax.core.Tracer):
            host = np.asarray(lengths)
            if host.min() < 1 or host.max() > prompt_len:
                raise ValueError(f"prompt_lengths must be in [1, {prompt_len}], got {host.tolist()}")
    rows = config.batch_size()
    if rows is not None and rows != batch:
        raise ValueError(f"SamplingConfig has per-row values for {rows} rows, the prompt has {batch}")
    cache_length = prompt_len + max_new_tokens + extra_slots
    model_max = getattr(model, "max_length", None)
    if isinstance(model_max, int) and cache_length > model_max:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) needs {cache_length} cache "
            f"slots, but the model supports max_length={model_max}"
        )
    return prompt.astype(jnp.int32), lengths, cache_length


def with_eos(config: SamplingConfig, eos_token_id) -> SamplingConfig:
    """`eos_token_id` (argument) overrides the config's; it also feeds min_new_tokens."""
    return config if eos_token_id is None else config.replace(eos_token_id=eos_token_id)


def prompt_history(prompt, lengths, vocab_size):
    """[B, V] counts of each row's prompt tokens (padding beyond `lengths` ignored)."""
    in_prompt = jnp.arange(prompt.shape[1])[None] < lengths[:, None]
    return token_counts(jnp.where(in_prompt, prompt, -1), vocab_size)


def last_prompt_logits(logits, lengths):
    """[B, P, V] prefill logits -> [B, V] at each row's last real prompt token."""
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def sample_next(key, logits, config, counts, num_generated, mesh=None):
    """One sampling step of the decode loop: [B, V] logits -> [B] tokens.

    With a `mesh` (axes "model" and optionally "data"), the logits and counts stay split
    over the vocabulary and the sampler runs where they lie (`rtdlm.sharding`).
    """
    state = SamplingState(counts, num_generated)
    if mesh is not None:
        batch_axis = "data" if "data" in mesh.axis_names else None
        return sharded_sample(mesh, key, logits, config, state=state, batch_axis=batch_axis).token_id
    processed = process_logits(logits, config, state=state)
    return sample_processed(row_keys(key, config, logits.shape[0]), processed).token_id


def add_tokens(counts, tokens, active):
    """counts[b, tokens[b]] += 1 for active rows. counts [B, V], tokens [B].

    An elementwise one-hot add rather than a scatter, so a vocabulary-sharded `counts`
    is updated in place on every device."""
    hit = (jnp.arange(counts.shape[-1])[None] == tokens[:, None]) & active[:, None]
    return counts + hit.astype(counts.dtype)


def generate(
    model,
    prompt_tokens,
    *,
    key: jax.Array,
    config: SamplingConfig,
    max_new_tokens: int,
    prompt_lengths=None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    stream: StreamCallback | None = None,
    stop_when_done: bool = False,
    mesh: Mesh | None = None,
) -> GenerationOutput:
    """Autoregressive generation: one prefill pass, then a compiled loop over new tokens.

    Args:
      model: follows the model contract (`rtdlm.decoding.model`); passed to `jit` as an
        argument, so its arrays are traced, not baked in.
      prompt_tokens: [B, P] int token ids, right-padded; `prompt_lengths` [B] gives each
        row's length (default: P for every row).
      key: PRNG key; step t uses `fold_in(key, t)` and `config.seed` per row if given.
      config: `SamplingConfig` (scalars or [B] per-row values); new values never recompile.
      max_new_tokens: static number of new tokens (the output width).
      eos_token_id: stops a row after it emits this token (default: `config.eos_token_id`).
      stream: optional host callback `stream(step, tokens[B])`, called in order as tokens
        are produced (`jax.debug.callback`), e.g. to print text in a notebook.
      stop_when_done: run a `lax.while_loop` that stops once every row hit EOS, instead of
        the fixed-length `lax.scan`.
      mesh: for a model whose logits are split over a "model" mesh axis (and the batch over
        "data", if the mesh has it): sample without gathering the vocabulary. The tokens
        equal those of the single-device run.

    Returns:
      `GenerationOutput(tokens [B, max_new_tokens], lengths [B])`.

    Example:
      >>> out = generate(model, prompt, key=jax.random.key(0), max_new_tokens=64,
      ...                config=create_sampling_config_balanced())
    """
    prompt, lengths, cache_length = check_generation_args(
        model, prompt_tokens, prompt_lengths, max_new_tokens, config
    )
    config = with_eos(config, eos_token_id)
    return _generate(
        model,
        prompt,
        lengths,
        key,
        config,
        pad_token_id,
        max_new_tokens=max_new_tokens,
        cache_length=cache_length,
        stream=stream,
        stop_when_done=stop_when_done,
        mesh=mesh,
    )


@functools.partial(
    jax.jit, static_argnames=("max_new_tokens", "cache_length", "stream", "stop_when_done", "mesh")
)
def _generate(
    model,
    prompt,
    lengths,
    key,
    config,
    pad_token_id,
    *,
    max_new_tokens,
    cache_length,
    stream,
    stop_when_done,
    mesh,
):
    batch, prompt_len = prompt.shape
    cache = model.init_cache(batch, cache_length)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, cache = model(prompt, positions, cache)  # [B, P, V]
    logits = last_prompt_logits(logits, lengths)
    eos = jnp.broadcast_to(jnp.asarray(config.eos_token_id, jnp.int32), (batch,))

    # Loop state: (step t, cache, next-token logits [B, V], history counts [B, V],
    #              position of the next token [B], finished rows [B], output [B, N])
    init = (
        0,
        cache,
        logits,
        prompt_history(prompt, lengths, logits.shape[-1]),
        lengths,
        jnp.zeros(batch, bool),
        jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
    )

    def step(state):
        t, cache, logits, counts, position, done, out = state
        token = sample_next(jax.random.fold_in(key, t), logits, config, counts, jnp.full(batch, t), mesh)
        token = jnp.where(done, pad_token_id, token)
        if stream is not None:
            jax.debug.callback(stream, t, token, ordered=True)
        out = out.at[:, t].set(token)
        counts = add_tokens(counts, token, ~done)
        done = done | (token == eos)
        logits, cache = model(token[:, None], position[:, None], cache)
        return t + 1, cache, logits[:, -1].astype(jnp.float32), counts, position + 1, done, out

    if stop_when_done:
        state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~jnp.all(s[5]), step, init)
    else:
        state = jax.lax.scan(lambda s, _: (step(s), None), init, length=max_new_tokens)[0]
    out = state[-1]
    return GenerationOutput(out, output_lengths(out, eos))


def output_lengths(tokens, eos):
    """[B] new tokens per row: up to and including the first EOS, else the full width."""
    width = tokens.shape[1]
    is_eos = tokens == eos[:, None]
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, width)
    return first_eos.astype(jnp.int32)
