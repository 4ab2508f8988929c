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

from rtdlm.decoding.common import (
    GenerationOutput,
    check_generation_args,
    last_prompt_logits,
    output_lengths,
    sample_tokens,
    with_eos,
)
from rtdlm.sampling import DEFAULT_PROCESSORS, Processor, SamplingConfig, as_processor

StreamCallback = Callable[[np.ndarray, np.ndarray], Any]  # (step, tokens [B]) on the host


@struct.dataclass
class DecodeState:
    """The carry of `generate`'s loop."""

    step: jax.Array  # [] int32: new tokens so far
    cache: Any  # the model's cache
    logits: jax.Array  # [B, V] float32 next-token logits
    processor_state: Any  # the processors' state (leaves [B, ...])
    position: jax.Array  # [B] position of the next token fed to the model
    done: jax.Array  # [B] bool: the row emitted EOS
    tokens: jax.Array  # [B, N] int32 output, pad_token_id where not yet written


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
    processors: Processor = DEFAULT_PROCESSORS,
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
      processors: the logits processors (`rtdlm.sampling.LogitsProcessor` or a plain
        function; default `DEFAULT_PROCESSORS`). Their state is initialised from the
        prompt, `process` runs before every draw and `update` after it (finished rows do
        not advance). A static argument: build it once.

    Returns:
      `GenerationOutput(tokens [B, max_new_tokens], lengths [B])`.

    Example:
      >>> out = generate(model, prompt, key=jax.random.key(0), max_new_tokens=64,
      ...                config=create_sampling_config_balanced())
    """
    prompt, lengths, cache_length = check_generation_args(
        model, prompt_tokens, prompt_lengths, max_new_tokens, config, pad_token_id=pad_token_id
    )
    config = with_eos(config, eos_token_id)
    return _generate(
        as_processor(processors),
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
    jax.jit,
    static_argnames=("processors", "max_new_tokens", "cache_length", "stream", "stop_when_done", "mesh"),
)
def _generate(
    processors,
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
    init = DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits,
        processor_state=processors.init(prompt, lengths, logits.shape[-1], config),
        position=lengths,
        done=jnp.zeros(batch, bool),
        tokens=jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
    )

    def step(s: DecodeState) -> DecodeState:
        key_t = jax.random.fold_in(key, s.step)
        token = sample_tokens(key_t, s.logits, config, processors, s.processor_state, mesh)
        token = jnp.where(s.done, pad_token_id, token)
        if stream is not None:
            jax.debug.callback(stream, s.step, token, ordered=True)
        logits, cache = model(token[:, None], s.position[:, None], s.cache)
        return DecodeState(
            step=s.step + 1,
            cache=cache,
            logits=logits[:, -1].astype(jnp.float32),
            processor_state=processors.update(s.processor_state, token, ~s.done, config),
            position=s.position + 1,
            done=s.done | (token == eos),
            tokens=s.tokens.at[:, s.step].set(token),
        )

    if stop_when_done:
        final = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), step, init)
    else:
        final = jax.lax.scan(lambda s, _: (step(s), None), init, length=max_new_tokens)[0]
    return GenerationOutput(final.tokens, output_lengths(final.tokens, eos))
