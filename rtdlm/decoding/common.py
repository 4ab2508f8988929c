"""What every decoder shares: argument checks, the output type, one sampling step, and
writing a round's accepted tokens into the output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from rtdlm.sampling import LogitsProcessor, SamplingConfig, row_keys, sample_processed
from rtdlm.sampling.sharded import sharded_sample


@struct.dataclass
class GenerationOutput:
    """New tokens only. After a row's EOS the rest of its row is `pad_token_id`."""

    tokens: jax.Array  # [B, max_new_tokens] int32
    lengths: jax.Array  # [B] new tokens per row, the EOS included
    num_drafted: jax.Array | None = None  # [B] speculative only: draft tokens proposed
    num_accepted: jax.Array | None = None  # [B] speculative only: draft tokens accepted


def vocab_size(model) -> int:
    """`model.vocab_size` if it is an int, else from one abstract (shape-only) forward pass."""
    if isinstance(getattr(model, "vocab_size", None), int):
        return model.vocab_size
    one = jnp.zeros((1, 1), jnp.int32)
    shape = jax.eval_shape(lambda m: m(one, one, m.init_cache(1, 1))[0], model)
    return shape.shape[-1]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_generation_args(
    model,
    prompt_tokens,
    prompt_lengths,
    max_new_tokens,
    config,
    extra_slots=0,
    extra_slots_for="",
    pad_token_id=0,
):
    """Python-side checks shared by every decoder. Returns (prompt [B, P], lengths [B], cache length).

    Concrete prompts are checked against the model's vocabulary (where it is known); inside
    `jit` an out-of-vocabulary id is read as the model reads it (the bundled model clamps)."""
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    config.check_complete()
    if not _is_int(pad_token_id) or not np.iinfo(np.int32).min <= pad_token_id <= np.iinfo(np.int32).max:
        raise TypeError(f"pad_token_id must be an int (int32), got {pad_token_id!r}")
    if not _is_int(max_new_tokens):
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
        lengths = prompt_lengths if isinstance(prompt_lengths, jax.Array) else np.asarray(prompt_lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"prompt_lengths must be integers, got {prompt_lengths!r}")
        if lengths.shape != (batch,):
            raise ValueError(f"prompt_lengths must have shape ({batch},), got {lengths.shape}")
        if not isinstance(lengths, jax.core.Tracer) and batch:
            host = np.asarray(lengths)
            if host.min() < 1 or host.max() > prompt_len:
                raise ValueError(f"prompt_lengths must be in [1, {prompt_len}], got {host.tolist()}")
        lengths = jnp.asarray(lengths, jnp.int32)
    if not isinstance(prompt, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer) and batch:
        vocab = getattr(model, "vocab_size", None)
        real = np.asarray(prompt)[np.arange(prompt_len)[None] < np.asarray(lengths)[:, None]]
        upper = vocab if isinstance(vocab, int) else np.iinfo(np.int32).max
        if real.min() < 0 or real.max() >= upper:
            raise ValueError(
                f"prompt_tokens must be token ids in [0, {upper}), got ids {real.min()}..{real.max()}"
            )
    rows = config.batch_size()
    if rows is not None and rows != batch:
        raise ValueError(f"SamplingConfig has per-row values for {rows} rows, the prompt has {batch}")
    cache_length = prompt_len + max_new_tokens + extra_slots
    model_max = getattr(model, "max_length", None)
    if isinstance(model_max, int) and cache_length > model_max:
        extra = f" + {extra_slots} slots for {extra_slots_for}" if extra_slots else ""
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}){extra} needs {cache_length} "
            f"cache slots, but the model supports max_length={model_max}"
        )
    return prompt.astype(jnp.int32), lengths, cache_length


def with_eos(config: SamplingConfig, eos_token_id) -> SamplingConfig:
    """`eos_token_id` (argument) overrides the config's; it also feeds min_new_tokens."""
    if eos_token_id is None:
        return config
    if not _is_int(eos_token_id) or not -1 <= eos_token_id <= np.iinfo(np.int32).max:
        raise ValueError(f"eos_token_id must be a token id (int32) or -1, got {eos_token_id!r}")
    return config.replace(eos_token_id=eos_token_id)


def last_prompt_logits(logits, lengths):
    """[B, P, V] prefill logits -> [B, V] float32 at each row's last real prompt token."""
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def sample_tokens(key, logits, config, processors: LogitsProcessor, state, mesh: Mesh | None = None):
    """One sampling step: [B, V] logits -> [B] tokens, processed with the processors' state.

    With a `mesh` (axes "model" and optionally "data"), the logits and the state stay split
    over the vocabulary and the sampler runs where they lie (`rtdlm.sampling.sharded`).
    """
    if mesh is not None:
        batch_axis = "data" if "data" in mesh.axis_names else None
        return sharded_sample(
            mesh, key, logits, config, state=state, batch_axis=batch_axis, processors=processors
        ).token_id
    processed = processors.process(logits, config, state)
    return sample_processed(row_keys(key, config, logits.shape[0]), processed).token_id


def output_lengths(tokens, eos):
    """[B] new tokens per row: up to and including the first EOS, else the full width."""
    width = tokens.shape[1]
    is_eos = tokens == eos[:, None]
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, width)
    return first_eos.astype(jnp.int32)


class Emitted(struct.PyTreeNode):
    """What `emit_accepted` wrote for one round, per row."""

    tokens: jax.Array  # [B, N] the output with this round's tokens written
    count: jax.Array  # [B] tokens written this round (0 for finished rows)
    last: jax.Array  # [B] the last token written (the previous one where none was)
    done: jax.Array  # [B] finished after this round (EOS written, or the output is full)


def emit_accepted(
    tokens, emitted, last, done, drafts, num_accepted, next_token, eos, pad_token_id
) -> Emitted:
    """Writes `drafts[:a]` then `next_token` after each row's `emitted` tokens, cut after an
    EOS and at the output's width; finished rows write nothing.

    tokens [B, N]; emitted [B]; last [B] the last token written so far; done [B] bool;
    drafts [B, K]; num_accepted [B] (a in [0, K]); next_token [B]; eos [B] (-1: none).
    """
    batch, width = tokens.shape
    rows = jnp.arange(batch)
    slot = jnp.arange(drafts.shape[1] + 1)[None]  # [1, K+1]
    new = jnp.where(slot < num_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
    new = jnp.where(slot <= num_accepted[:, None], new, pad_token_id)
    is_eos = (new == eos[:, None]) & (slot <= num_accepted[:, None])
    upto_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, num_accepted + 1)
    count = jnp.where(done, 0, jnp.minimum(upto_eos, width - emitted))  # [B]
    write = slot < count[:, None]
    tokens = tokens.at[rows[:, None], jnp.where(write, emitted[:, None] + slot, width)].set(new, mode="drop")
    last = jnp.where(count > 0, new[rows, jnp.maximum(count - 1, 0)], last)
    done = done | jnp.any(is_eos & write, 1) | (emitted + count >= width)
    return Emitted(tokens, count.astype(jnp.int32), last, done)
