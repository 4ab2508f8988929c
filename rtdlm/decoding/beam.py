"""`beam_search()`: Hugging Face transformers' beam search in one compiled `lax.while_loop`.

Each step follows `transformers`' `GenerationMixin._beam_search` (version 5): the running
beams' next-token log-probabilities (log-softmax, then the processors, per beam), plus each
beam's running score, give `k * V` candidates per prompt; the best `2k` of them are kept.
A candidate that ends in EOS (or fills the output) is a finished hypothesis scored
`sum logprob / length ** length_penalty`, `length` its new tokens with the EOS; the best `k`
hypotheses so far are kept, best first. The best `k` candidates that did not end continue
as the running beams: the cache and the processors' state follow their parent beam.

A prompt row is done (its hypotheses no longer change) when `early_stopping=True` and it
has `k` finished hypotheses, or when no running beam can beat its worst hypothesis: the best
running score divided by `current_length ** length_penalty` (`early_stopping=False`,
Hugging Face's default heuristic) or by `max_new_tokens ** length_penalty` where
`length_penalty > 0` (`early_stopping="never"`). The loop stops once every row is done.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rtdlm.decoding.common import check_generation_args, last_prompt_logits, with_eos
from rtdlm.decoding.model import prefill_prompt, reorder_cache
from rtdlm.sampling import DEFAULT_PROCESSORS, Processor, SamplingConfig, as_processor, chain
from rtdlm.sampling.processors import (
    apply_logit_bias,
    apply_penalties,
    ban_config_ngrams,
    mask_banned_tokens,
    mask_eos_before_min_new_tokens,
)

# Hugging Face's score for "not a candidate" (added, so the original order survives in ties).
_EXCLUDED = -1.0e9
_NEVER = 2  # early_stopping codes: 0 False, 1 True, 2 "never"

# DEFAULT_PROCESSORS without temperature and truncation: beam search ranks log-probabilities,
# it does not sample (Hugging Face applies no warpers when do_sample=False).
BEAM_PROCESSORS = chain(
    apply_logit_bias,
    mask_banned_tokens,
    mask_eos_before_min_new_tokens,
    apply_penalties,
    ban_config_ngrams,
)


@struct.dataclass
class BeamSearchOutput:
    """The `num_beams` best hypotheses per prompt, best first (new tokens only)."""

    tokens: jax.Array  # [B, k, max_new_tokens] int32, pad_token_id after the EOS
    scores: jax.Array  # [B, k] float32: sum logprob / length ** length_penalty
    lengths: jax.Array  # [B, k] int32 new tokens, the EOS included


@struct.dataclass
class BeamState:
    """The carry of `beam_search`'s loop. Rows of `[B*k, ...]` arrays are beam `i % k` of
    prompt `i // k`."""

    step: jax.Array  # [] int32: new tokens so far
    cache: Any  # the model's cache, B*k rows
    logits: jax.Array  # [B*k, V] float32 next-token logits of the running beams
    processor_state: Any  # leaves [B*k, ...]
    position: jax.Array  # [B*k] position of the next token fed to the model
    running_tokens: jax.Array  # [B, k, N] int32
    running_scores: jax.Array  # [B, k] float32 sum of processed logprobs, best first
    tokens: jax.Array  # [B, k, N] int32 finished hypotheses, best first
    scores: jax.Array  # [B, k] float32 their scores (-1e9: none yet)
    lengths: jax.Array  # [B, k] int32
    finished: jax.Array  # [B, k] bool: slot holds a finished hypothesis
    improvable: jax.Array  # [B] bool: a running beam may still beat the worst hypothesis
    all_ended: jax.Array  # [] bool: every candidate of every row ended in the last step


def _take(values, indices):
    """values [B, M, ...] gathered along axis 1 by indices [B, K] -> [B, K, ...]."""
    indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, indices, axis=1)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_beam_args(num_beams, length_penalty, early_stopping) -> tuple[float, int]:
    """Python-side checks of the beam arguments. Returns (length_penalty, early-stopping code)."""
    if isinstance(num_beams, (bool, np.bool_)) or not _is_int(num_beams):
        raise TypeError(f"num_beams must be an int, got {num_beams!r}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if isinstance(length_penalty, (bool, np.bool_)) or not isinstance(
        length_penalty, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"length_penalty must be a number, got {length_penalty!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    if isinstance(early_stopping, str) and early_stopping == "never":
        return float(length_penalty), _NEVER
    if not isinstance(early_stopping, (bool, np.bool_)):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    return float(length_penalty), int(early_stopping)


def beam_search(
    model,
    prompt_tokens,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None = None,
    prompt_lengths=None,
    processors: Processor = DEFAULT_PROCESSORS,
    config: SamplingConfig | None = None,
    pad_token_id: int = 0,
) -> BeamSearchOutput:
    """Beam search with Hugging Face transformers' semantics (`generate(num_beams=k,
    do_sample=False)`), in one compiled loop.

    Args:
      model: follows the model contract (`rtdlm.decoding.model`); its cache is reordered by
        beam with `model.reorder_cache(cache, indices)` if it has one, else every cache
        leaf is gathered on axis 0 (its batch axis).
      prompt_tokens: [B, P] int token ids, right-padded; `prompt_lengths` [B] gives each
        row's length (default: P for every row).
      num_beams: k, the beams per prompt (static: a new k compiles a new program).
      max_new_tokens: static output width N.
      length_penalty: a finished hypothesis scores `sum logprob / length ** length_penalty`
        (length: its new tokens, EOS included); > 0 favours longer ones. Traced.
      early_stopping: True: a row is done once it has k finished hypotheses; False: also
        once the best running beam, at its current length, cannot beat the worst one
        (Hugging Face's heuristic); "never": that bound taken at `max_new_tokens` when
        `length_penalty > 0`. Traced.
      eos_token_id: ends a hypothesis (default: `config.eos_token_id`; -1 or None: none,
        so every hypothesis has N tokens); `config.stop_token_ids` end one too.
      processors: run on each beam's log-probabilities with its own state (gathered from
        the parent beam each step), as Hugging Face's logits processors: repetition
        penalty, no-repeat-ngram, bad words, min_new_tokens, ... `DEFAULT_PROCESSORS`
        runs without temperature and truncation, and the config's sampling fields
        (temperature, top-k/p, min-p, typical-p, do_sample) are ignored: beam search ranks
        by log-probability. A static argument: build it once.
      config: `SamplingConfig` for the processors (default `SamplingConfig()`); scalars or
        [B] per-prompt values, new values never recompile.
      pad_token_id: fills a hypothesis after its EOS.

    Returns:
      `BeamSearchOutput(tokens [B, k, N], scores [B, k], lengths [B, k])`, best first.

    Example:
      >>> out = beam_search(model, prompt, num_beams=4, max_new_tokens=8)
      >>> out.tokens.shape, out.scores.shape
      ((1, 4, 8), (1, 4))
    """
    length_penalty, early_stopping = check_beam_args(num_beams, length_penalty, early_stopping)
    config = SamplingConfig() if config is None else config
    prompt, lengths, cache_length = check_generation_args(
        model, prompt_tokens, prompt_lengths, max_new_tokens, config, pad_token_id=pad_token_id
    )
    config = with_eos(config, eos_token_id)
    config = config.replace(temperature=1.0, do_sample=True, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)
    processors = BEAM_PROCESSORS if processors is DEFAULT_PROCESSORS else as_processor(processors)
    return _beam_search(
        processors,
        model,
        prompt,
        lengths,
        config,
        jnp.float32(length_penalty),
        jnp.int32(early_stopping),
        pad_token_id,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        cache_length=cache_length,
    )


@functools.partial(jax.jit, static_argnames=("processors", "num_beams", "max_new_tokens", "cache_length"))
def _beam_search(
    processors,
    model,
    prompt,
    lengths,
    config,
    length_penalty,
    early_stopping,
    pad_token_id,
    *,
    num_beams,
    max_new_tokens,
    cache_length,
):
    batch, prompt_len = prompt.shape
    k, width = num_beams, max_new_tokens
    stop_ids = config.stop_ids(batch)  # [B, S], -1 = none
    early_true, never = early_stopping == 1, early_stopping == _NEVER

    # Prefill each prompt once, then copy its cache, logits and state to its k beams.
    logits, cache = prefill_prompt(model, prompt, cache_length)  # [B, P, V]
    vocab = logits.shape[-1]
    # Hugging Face keeps (1 + number of EOS ids) * k candidates, at least 2k: enough for k
    # running beams even when the best k candidates all end.
    num_candidates = min(max(2, 1 + stop_ids.shape[1]) * k, k * vocab)
    in_top_k = (jnp.arange(num_candidates) < k)[None]  # [1, 2k]: only these may become hypotheses
    expand = jnp.repeat(jnp.arange(batch), k)  # [B*k]
    cache = reorder_cache(model, cache, expand)
    beam_config = config.repeat_rows(k)
    beam_lengths = lengths[expand]
    running_scores = jnp.where(jnp.arange(k) == 0, 0.0, _EXCLUDED)  # only beam 0 starts
    init = BeamState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=last_prompt_logits(logits, lengths)[expand],
        processor_state=processors.init(prompt[expand], beam_lengths, vocab, beam_config),
        position=beam_lengths,
        running_tokens=jnp.full((batch, k, width), pad_token_id, jnp.int32),
        running_scores=jnp.broadcast_to(running_scores, (batch, k)).astype(jnp.float32),
        tokens=jnp.full((batch, k, width), pad_token_id, jnp.int32),
        scores=jnp.full((batch, k), _EXCLUDED, jnp.float32),
        lengths=jnp.zeros((batch, k), jnp.int32),
        finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones(batch, bool),
        all_ended=jnp.zeros((), bool),
    )

    def step(s: BeamState) -> BeamState:
        logprobs = jax.nn.log_softmax(s.logits, axis=-1)
        logprobs = processors.process(logprobs, beam_config, s.processor_state)  # [B*k, V]
        totals = s.running_scores[:, :, None] + logprobs.reshape(batch, k, vocab)
        cand_scores, cand_index = jax.lax.top_k(totals.reshape(batch, k * vocab), num_candidates)
        parent, token = cand_index // vocab, cand_index % vocab  # [B, 2k]
        cand_tokens = _take(s.running_tokens, parent).at[:, :, s.step].set(token)  # [B, 2k, N]
        ended = jnp.any((token[:, :, None] == stop_ids[:, None]) & (stop_ids[:, None] >= 0), axis=-1)
        ended |= s.step == width - 1  # [B, 2k]: ended in EOS, or the output is full

        # The best k candidates that did not end run on.
        running = cand_scores + ended * _EXCLUDED
        pick = jax.lax.top_k(running, k)[1]  # [B, k]
        running_scores = _take(running, pick)
        running_tokens = _take(cand_tokens, pick)
        beam_parent = _take(parent, pick)  # [B, k]

        # Ended candidates among the best k compete with the hypotheses so far (done rows'
        # candidates are excluded, so those rows keep their hypotheses).
        length = s.step + 1
        final = cand_scores / length.astype(jnp.float32) ** length_penalty
        final += (jnp.all(s.finished, axis=1, keepdims=True) & early_true) * _EXCLUDED
        final += ~s.improvable[:, None] * _EXCLUDED
        final += ~(ended & in_top_k) * _EXCLUDED
        merged_scores = jnp.concatenate([s.scores, final], axis=1)  # [B, k + 2k]
        keep = jax.lax.top_k(merged_scores, k)[1]
        new_lengths = jnp.full((batch, num_candidates), length, jnp.int32)
        scores = _take(merged_scores, keep)
        tokens = _take(jnp.concatenate([s.tokens, cand_tokens], axis=1), keep)
        lengths = _take(jnp.concatenate([s.lengths, new_lengths], axis=1), keep)
        finished = _take(jnp.concatenate([s.finished, ended & in_top_k], axis=1), keep)

        # Can the best running beam still beat the worst hypothesis? (HF's heuristic.)
        bound_length = jnp.where(never & (length_penalty > 0), width, length).astype(jnp.float32)
        best_running = running_scores[:, 0] / bound_length**length_penalty  # [B]
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _EXCLUDED)  # [B, k]
        improvable = s.improvable & jnp.any(best_running[:, None] > worst, axis=1)

        # The running beams' cache and processor state come from their parents.
        rows = (jnp.arange(batch)[:, None] * k + beam_parent).reshape(-1)  # [B*k]
        next_token = running_tokens[:, :, s.step].reshape(-1)  # [B*k]
        state = jax.tree.map(lambda leaf: leaf[rows], s.processor_state)
        state = processors.update(state, next_token, jnp.ones(batch * k, bool), beam_config)
        cache = reorder_cache(model, s.cache, rows)
        logits, cache = model(next_token[:, None], s.position[:, None], cache)
        return BeamState(
            step=length,
            cache=cache,
            logits=logits[:, -1].astype(jnp.float32),
            processor_state=state,
            position=s.position + 1,
            running_tokens=running_tokens,
            running_scores=running_scores,
            tokens=tokens,
            scores=scores,
            lengths=lengths,
            finished=finished,
            improvable=improvable,
            all_ended=jnp.all(ended),
        )

    def not_done(s: BeamState):
        # Hugging Face's stopping rule: every row done (no improvement possible, or all
        # finished with early_stopping=True), or every candidate ended.
        open_rows = jnp.any(s.improvable) & ~(jnp.all(s.finished) & early_true)
        return (s.step < width) & open_rows & ~s.all_ended

    final = jax.lax.while_loop(not_done, step, init)
    return BeamSearchOutput(final.tokens, final.scores, final.lengths)
