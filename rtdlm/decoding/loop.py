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
    check_output_args,
    emit_accepted,
    expand_samples,
    last_prompt_logits,
    outputs,
    sample_tokens,
    stop_sequences_array,
    with_eos,
    write_rows,
)
from rtdlm.sampling import DEFAULT_PROCESSORS, Processor, SamplingConfig, as_processor

StreamCallback = Callable[[np.ndarray, np.ndarray], Any]  # (step, tokens [B]) on the host


@struct.dataclass
class DecodeState:
    """The carry of `generate`'s loop."""

    step: jax.Array  # [] int32: loop iterations so far
    cache: Any  # the model's cache
    logits: jax.Array  # [B, V] float32 next-token logits
    processor_state: Any  # the processors' state (leaves [B, ...])
    position: jax.Array  # [B] position of the next token fed to the model
    done: jax.Array  # [B] bool: the row stopped
    emitted: jax.Array  # [B] int32 new tokens per row (the stop included)
    tokens: jax.Array  # [B, N] int32 output, pad_token_id where not yet written
    logprobs: jax.Array  # [B, N] float32, 0.0 where not written
    top_ids: jax.Array  # [B, N, k] int32
    top_logprobs: jax.Array  # [B, N, k] float32


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
    stop_token_ids=None,
    stop_sequences=None,
    num_samples: int = 1,
    logprobs_mode: str = "processed",
    num_top_logprobs: int = 0,
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
      stop_token_ids: more ids that end a row like the EOS ([S] for every row or [B, S],
        -1 padded; default `config.stop_token_ids`). min_new_tokens masks all of them.
      stop_sequences: token-id sequences that end a row once generated (a list for every
        row, or one list per row); the stop is included in the output and its length.
      num_samples: n samples per prompt (static): the output has B * n rows, row b * n + i
        is sample i of prompt b.
      logprobs_mode: "processed" (the distribution each token was drawn from) or "raw" (the
        model's own log-softmax) for `.logprobs` and `.top_logprobs`.
      num_top_logprobs: k (static): record the k most probable tokens per step.

    Returns:
      `GenerationOutput(tokens [B, max_new_tokens], lengths [B], logprobs [B, N])`, plus
      `top_token_ids` / `top_logprobs` [B, N, k] when k > 0.

    Example:
      >>> out = generate(model, prompt, key=jax.random.key(0), max_new_tokens=64,
      ...                config=create_sampling_config_balanced())
    """
    config = with_eos(config, eos_token_id, stop_token_ids)
    check_output_args(logprobs_mode, num_top_logprobs, num_samples)
    prompt, lengths, cache_length = check_generation_args(
        model, prompt_tokens, prompt_lengths, max_new_tokens, config, pad_token_id=pad_token_id
    )
    stops = stop_sequences_array(stop_sequences, prompt.shape[0])
    prompt, lengths, config, stops = expand_samples(num_samples, prompt, lengths, config, stops)
    return _generate(
        as_processor(processors),
        model,
        prompt,
        lengths,
        key,
        config,
        pad_token_id,
        stops,
        max_new_tokens=max_new_tokens,
        cache_length=cache_length,
        stream=stream,
        stop_when_done=stop_when_done,
        mesh=mesh,
        logprobs_mode=logprobs_mode,
        num_top_logprobs=num_top_logprobs,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "processors",
        "max_new_tokens",
        "cache_length",
        "stream",
        "stop_when_done",
        "mesh",
        "logprobs_mode",
        "num_top_logprobs",
    ),
)
def _generate(
    processors,
    model,
    prompt,
    lengths,
    key,
    config,
    pad_token_id,
    stop_sequences,
    *,
    max_new_tokens,
    cache_length,
    stream,
    stop_when_done,
    mesh,
    logprobs_mode,
    num_top_logprobs,
):
    batch, prompt_len = prompt.shape
    cache = model.init_cache(batch, cache_length)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, cache = model(prompt, positions, cache)  # [B, P, V]
    logits = last_prompt_logits(logits, lengths)
    stop_ids = config.stop_ids(batch)  # [B, S]
    width, k = max_new_tokens, num_top_logprobs
    init = DecodeState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits,
        processor_state=processors.init(prompt, lengths, logits.shape[-1], config),
        position=lengths,
        done=jnp.zeros(batch, bool),
        emitted=jnp.zeros(batch, jnp.int32),
        tokens=jnp.full((batch, width), pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, width), jnp.float32),
        top_ids=jnp.full((batch, width, k), pad_token_id, jnp.int32),
        top_logprobs=jnp.zeros((batch, width, k), jnp.float32),
    )

    def step(s: DecodeState) -> DecodeState:
        key_t = jax.random.fold_in(key, s.step)
        sampled = sample_tokens(
            key_t, s.logits, config, processors, s.processor_state, mesh, logprobs_mode, num_top_logprobs
        )
        token = jnp.where(s.done, pad_token_id, sampled.token)
        if stream is not None:
            jax.debug.callback(stream, s.step, token, ordered=True)
        out = emit_accepted(
            s.tokens,
            s.emitted,
            token,
            s.done,
            jnp.zeros((batch, 0), jnp.int32),
            jnp.zeros(batch, jnp.int32),
            token,
            stop_ids,
            pad_token_id,
            stop_sequences,
        )
        logits, cache = model(token[:, None], s.position[:, None], s.cache)
        return DecodeState(
            step=s.step + 1,
            cache=cache,
            logits=logits[:, -1].astype(jnp.float32),
            processor_state=processors.update(s.processor_state, token, ~s.done, config),
            position=s.position + 1,
            done=out.done,
            emitted=s.emitted + out.count,
            tokens=out.tokens,
            logprobs=write_rows(s.logprobs, s.emitted, sampled.logprob[:, None], out.count),
            top_ids=write_rows(s.top_ids, s.emitted, sampled.top_ids[:, None], out.count),
            top_logprobs=write_rows(s.top_logprobs, s.emitted, sampled.top_logprobs[:, None], out.count),
        )

    if stop_when_done:
        final = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), step, init)
    else:
        final = jax.lax.scan(lambda s, _: (step(s), None), init, length=max_new_tokens)[0]
    return outputs(final, num_top_logprobs)
