"""`generate()`: prefill in one forward pass, then one compiled loop over new tokens.

Compiled once per length bucket (`common.length_bucket`: powers of two from 16, and
above 256 also 3/4 of each): the prompt is right-padded to its bucket and the output
buffers get the bucket of `max_new_tokens`, which is a traced per-row limit. The steps
run in `lax.scan` chunks of 8 inside a `lax.while_loop` that ends once every row is done,
so a bucket costs slack in the buffers and the KV cache (about 6% at 100 new tokens, B=16,
on the bundled model) and at most 7 steps, not a bucket's worth. The loop carries one KV
cache, updated in place. A stream callback is called through one module-level dispatcher
under a traced `lax.cond`, so any function, or none, streams with the same program (on one
device and without JAX's persistent compilation cache: `_plain_runs_stream_branch`). Seeds
(None or a value) and logit_bias / banned_token_ids lists of any length do not recompile
either (`stable_structure`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import Mesh

from rtdlm.decoding.common import (
    GenerationOutput,
    bucketed_prompt,
    check_generation_args,
    check_output_args,
    emit_accepted,
    expand_samples,
    last_prompt_logits,
    new_token_limits,
    outputs,
    sample_tokens,
    stable_structure,
    step_keys,
    stop_sequences_array,
    trim,
    with_eos,
    write_rows,
)
from rtdlm.decoding.model import prefill_prompt
from rtdlm.sampling import DEFAULT_PROCESSORS, Processor, SamplingConfig, as_processor

STEPS_PER_CHECK = 8
StreamCallback = Callable[..., Any]  # (step, tokens [B]) on the host; + texts with stream_text


class TextStream:
    """Per-row text from a stream of token ids: each call returns the text that became
    ready, holding back an incomplete UTF-8 sequence (`decode` ends in U+FFFD) until the
    tokens that finish it arrive. `decode(ids) -> str` decodes a whole row (as a tokenizer
    does); the new text is the decoded row minus what was already returned."""

    def __init__(self, decode: Callable[[Sequence[int]], str], batch: int):
        self.decode = decode
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.sent = [0] * batch  # characters returned per row

    def __call__(self, tokens, active) -> list[str]:
        """tokens [B], active [B] bool (a finished row's token is padding) -> texts [B]."""
        rows = zip(np.asarray(tokens).tolist(), np.asarray(active).tolist(), strict=True)
        return [self._ready_text(row, token, on) for row, (token, on) in enumerate(rows)]

    def _ready_text(self, row: int, token: int, active: bool) -> str:
        if not active:
            return ""
        self.ids[row].append(token)
        text = self.decode(self.ids[row])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        new, self.sent[row] = text[self.sent[row] :], len(text)
        return new


_STREAMS: dict[int, Callable] = {}  # stream id -> the host function of one generate call
_STREAM_IDS = itertools.count()


def _dispatch_stream(stream_id, step, tokens, active):
    if np.any(active):  # the steps of a chunk after every row is done stream nothing
        _STREAMS[int(stream_id)](step, tokens, active)


def _end_stream(stream_id):
    if stream_id >= 0:  # a negative id stays: its program may run again (inside an outer jit)
        _STREAMS.pop(int(stream_id), None)


def _plain_runs_stream_branch() -> bool:
    """Whether a run without a stream compiles the stream branch anyway (so that streaming
    and plain runs share one program): not where the program could span devices (ordered
    callbacks run on one device only), nor with JAX's persistent compilation cache on (the
    CLI turns it on): it stores no program with host callbacks."""
    cache_on = bool(jax.config.jax_compilation_cache_dir) and jax.config.jax_enable_compilation_cache
    return jax.device_count() == 1 and not cache_on


def streaming(callback, stream_id, *args):
    """Calls `callback(stream_id, *args)` on the host, in order, when the run streams
    (`stream_id != -1`): a traced branch, so streaming and plain runs share one program
    (the skipped branch costs a predicate per step)."""
    lax.cond(
        stream_id != -1,
        lambda: jax.debug.callback(callback, stream_id, *args, ordered=True),
        lambda: None,
    )


def _register_stream(stream, stream_text, batch: int, once: bool) -> int:
    """The id under which `_dispatch_stream` finds this call's stream (removed at the end
    of the run when `once`)."""
    texts = TextStream(stream_text, batch) if stream_text is not None else None

    def call(step, tokens, active):
        if texts is None:
            stream(step, tokens)
        else:
            stream(step, tokens, texts(tokens, active))

    stream_id = next(_STREAM_IDS) if once else -next(_STREAM_IDS) - 2  # -1 is "no stream"
    _STREAMS[stream_id] = call
    return stream_id


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
    stream_text: Callable[[Sequence[int]], str] | None = None,
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
      max_new_tokens: new tokens per row: an int, or a [B] int array of per-row limits. The
        output width is the (largest) value; programs are compiled per power-of-two bucket
        of it, so new values within a bucket do not recompile.
      eos_token_id: stops a row after it emits this token (default: `config.eos_token_id`).
      stream: optional host callback `stream(step, tokens[B])`, called in order as tokens
        are produced (`jax.debug.callback`), e.g. to print text in a notebook. Finished
        rows get `pad_token_id`. A new function does not recompile, nor does none on one
        device without JAX's persistent compilation cache (else plain runs compile a
        program without the callback).
      stream_text: `decode(ids) -> str` (a row's ids so far to text): the stream is then
        called as `stream(step, tokens, texts)`, texts [B] the new text of each row, with
        an incomplete UTF-8 sequence held back until it completes.
      stop_when_done: kept for compatibility: once every row is done, the loop skips the model.
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
    del stop_when_done  # the chunks after every row is done always skip the model
    config = with_eos(config, eos_token_id, stop_token_ids)
    check_output_args(logprobs_mode, num_top_logprobs, num_samples)
    if stream is None and stream_text is not None:
        raise ValueError("stream_text needs a stream callback to hand the text to")
    limits, width = new_token_limits(max_new_tokens, prompt_tokens)
    prompt, lengths, _ = check_generation_args(
        model, prompt_tokens, prompt_lengths, width, config, pad_token_id=pad_token_id
    )
    stops = stop_sequences_array(stop_sequences, prompt.shape[0])
    prompt, lengths, config, stops = expand_samples(num_samples, prompt, lengths, config, stops)
    limits = np.repeat(limits, num_samples)
    prompt, output_bucket, cache_length = bucketed_prompt(prompt, width, getattr(model, "max_length", None))
    seeded = None
    if mesh is None:  # the sharded sampler derives its keys itself
        config, seeded = stable_structure(config)
    stream_id = -1
    if stream is not None:
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((prompt, key, config)))
        stream_id = _register_stream(stream, stream_text, prompt.shape[0], once=not traced)
    out = _generate(
        as_processor(processors),
        model,
        prompt,
        lengths,
        key,
        config,
        pad_token_id,
        stops,
        jnp.asarray(limits),
        jnp.int32(stream_id),
        seeded,
        max_new_tokens=output_bucket,
        cache_length=cache_length,
        callbacks=stream is not None or (mesh is None and _plain_runs_stream_branch()),
        mesh=mesh,
        logprobs_mode=logprobs_mode,
        num_top_logprobs=num_top_logprobs,
    )
    return trim(out, width)


@functools.partial(
    jax.jit,
    static_argnames=(
        "processors",
        "max_new_tokens",
        "cache_length",
        "callbacks",
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
    limits,
    stream_id,
    seeded,
    *,
    max_new_tokens,
    cache_length,
    callbacks,
    mesh,
    logprobs_mode,
    num_top_logprobs,
):
    batch, prompt_len = prompt.shape
    logits, cache = prefill_prompt(model, prompt, cache_length)  # [B, P, V]
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
        keys = None if seeded is None else step_keys(key_t, config, seeded, batch)
        sampled = sample_tokens(
            key_t,
            s.logits,
            config,
            processors,
            s.processor_state,
            mesh,
            logprobs_mode,
            num_top_logprobs,
            keys,
        )
        token = jnp.where(s.done, pad_token_id, sampled.token)
        if callbacks:
            streaming(_dispatch_stream, stream_id, s.step, token, ~s.done)
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
            limits,
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

    chunk = math.gcd(max_new_tokens, STEPS_PER_CHECK)

    def more_steps(s: DecodeState):
        # Once every row is done (by its limit at the latest), the rest of the bucket is
        # skipped, checked every `chunk` steps: a check per step would cost more. A while
        # loop, not a cond in a scan: a cond's skip branch would copy the KV cache.
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def chunk_of_steps(s: DecodeState):
        return jax.lax.scan(lambda s, _: (step(s), None), s, length=chunk)[0]

    final = jax.lax.while_loop(more_steps, chunk_of_steps, init)
    if callbacks:
        streaming(_end_stream, stream_id)
    return outputs(final, num_top_logprobs)
