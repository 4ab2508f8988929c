"""Lossless, batched speculative decoding with a draft model, as one compiled program.

Each round (one `lax.while_loop` iteration): the drafter proposes K tokens (`lax.scan`),
the target scores all K+1 positions in one forward pass, and `verify_drafts` accepts a
prefix per row. Rows advance by their own accepted counts: positions and output offsets
are per row, and rejected cache entries are simply overwritten later through positions.

Stateful logits processors stay lossless: draft j is drawn from q_j processed with the
processors' state after drafts < j, the target's p_j is processed with that same state,
and after verification each row keeps the state at its accepted prefix, updated with the
token that follows it.

The loop is written once over a `Drafting` strategy (prefill / draft step / verify pass);
the draft-model strategy lives here, the early-exit one in `self_speculative.py`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

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
    record,
    sample_tokens,
    stop_sequences_array,
    trim,
    vocab_size,
    with_eos,
    write_rows,
)
from rtdlm.decoding.model import prefill_prompt
from rtdlm.decoding.verify import verify_drafts
from rtdlm.sampling import (
    DEFAULT_PROCESSORS,
    Processor,
    SamplingConfig,
    as_processor,
    draw,
    probabilities,
    row_keys,
)


class Proposal(struct.PyTreeNode):
    """One round's drafts, as the verification needs them."""

    caches: Any  # the drafting strategy's caches after drafting
    drafts: jax.Array  # [B, K] int32 drafted tokens (an id outside [0, V) is never accepted)
    q: jax.Array  # [B, K, V] the distributions the drafts were drawn from (one-hot: a point mass)
    states: Any  # processor states, leaves [B, K+1, ...]: position j = state after drafts < j
    saved: Any  # whatever `verify` may reuse from drafting


class Round(struct.PyTreeNode):
    """What a drafting strategy sees of the loop at the start of a round."""

    last: jax.Array  # [B] the last emitted token, not yet fed to the models
    position: jax.Array  # [B] its position
    processor_state: Any  # the processors' state after every emitted token
    prompt: jax.Array  # [B, P] the prompt (right-padded)
    prompt_lengths: jax.Array  # [B]
    tokens: jax.Array  # [B, N] the output so far (pad after `emitted`)
    emitted: jax.Array  # [B] tokens emitted so far


class Drafting(abc.ABC):
    """How a speculative decoder drafts and verifies; `models` and `caches` are PyTrees.

    propose(models, caches, round, key, processors, config, num_drafts) -> Proposal
      drafts K tokens per row. Draft j must be drawn from `q[:, j]` (any distribution,
      e.g. a point mass) and `states[:, j]` must be the processors' state after drafts < j
      (`advance_states`), so that verification stays lossless.
    verify(models, caches, tokens [B, K+1], positions [B, K+1], saved) -> (logits [B, K+1, V], caches)
      scores the round's last token and its K drafts. Afterwards the drafter must have seen
      every token up to the last draft, so the next round feeds it only the new last token.
    """

    @abc.abstractmethod
    def prefill(self, models, prompt, cache_length) -> tuple[jax.Array, Any]:
        """(logits [B, P, V], caches) for the prompt [B, P], caches of `cache_length` slots."""

    @abc.abstractmethod
    def propose(self, models, caches, round: Round, key, processors, config, num_drafts) -> Proposal:
        """One round's drafts (see the class docstring)."""

    @abc.abstractmethod
    def verify(self, models, caches, tokens, positions, saved) -> tuple[jax.Array, Any]:
        """The verify pass (see the class docstring)."""


def _stack_rows(stacked, final):
    """Per-position states: [K, B, ...] leaves and the [B, ...] state after all K drafts ->
    [B, K+1, ...] (position j: the state after drafts < j)."""
    return jax.tree.map(
        lambda s, f: jnp.concatenate([jnp.swapaxes(s, 0, 1), f[:, None]], axis=1), stacked, final
    )


def advance_states(processors, state, drafts, config):
    """The processors' state along fixed drafts [B, K]: leaves [B, K+1, ...] (see Proposal)."""
    every_row = jnp.ones(drafts.shape[0], bool)

    def step(state, drafted):
        return processors.update(state, drafted, every_row, config), state

    final, states = jax.lax.scan(step, state, drafts.T)
    return _stack_rows(states, final)


class ModelDrafting(Drafting):
    """Drafts by sampling a model's next-token distribution, one token fed per step.

    draft(models, caches, tokens [B, 1], positions [B, 1]) -> (logits [B, V], caches, saved)
      feeds one token, returns the next-token logits and anything the verify pass may
      reuse (`saved`, stacked over the K draft steps).
    """

    @abc.abstractmethod
    def draft(self, models, caches, tokens, positions) -> tuple[jax.Array, Any, Any]:
        """One draft step (see the class docstring)."""

    def propose(self, models, caches, round, key, processors, config, num_drafts):
        batch = round.last.shape[0]
        every_row = jnp.ones(batch, bool)

        def step(carry, j):
            caches, previous, state = carry
            logits, caches, saved = self.draft(
                models, caches, previous[:, None], (round.position + j)[:, None]
            )
            q = probabilities(processors.process(logits, config, state))  # [B, V], draft j's distribution
            drafted = draw(row_keys(jax.random.fold_in(key, j), config, batch), q)
            state_after = processors.update(state, drafted, every_row, config)
            return (caches, drafted, state_after), (drafted, q, state, saved)

        carry = (caches, round.last, round.processor_state)
        (caches, _, final_state), (drafts, q, states, saved) = jax.lax.scan(
            step, carry, jnp.arange(num_drafts)
        )
        return Proposal(caches, drafts.T, jnp.swapaxes(q, 0, 1), _stack_rows(states, final_state), saved)


@dataclasses.dataclass(frozen=True)
class DraftModel(ModelDrafting):
    """models = (target, draft); caches = (target cache, draft cache)."""

    def prefill(self, models, prompt, cache_length):
        target, drafter = models
        logits, target_cache = prefill_prompt(target, prompt, cache_length)
        _, draft_cache = prefill_prompt(drafter, prompt, cache_length)
        return logits, (target_cache, draft_cache)

    def draft(self, models, caches, tokens, positions):
        logits, draft_cache = models[1](tokens, positions, caches[1])
        return logits[:, -1], (caches[0], draft_cache), None

    def verify(self, models, caches, tokens, positions, saved):
        target, drafter = models
        logits, target_cache = target(tokens, positions, caches[0])
        # The draft steps fed the round's tokens but the last draft: feed it too (its
        # logits are unused), in case every draft is accepted.
        _, draft_cache = drafter(tokens[:, -1:], positions[:, -1:], caches[1])
        return logits, (target_cache, draft_cache)


def check_num_speculative_tokens(num_speculative_tokens) -> None:
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, (int, np.integer)):
        raise TypeError(f"num_speculative_tokens must be an int, got {num_speculative_tokens!r}")
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")


def speculative_generate(
    target_model,
    draft_model,
    prompt_tokens,
    *,
    key: jax.Array,
    config: SamplingConfig,
    max_new_tokens: int,
    num_speculative_tokens: int = 4,
    prompt_lengths=None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    processors: Processor = DEFAULT_PROCESSORS,
    **output_args,
) -> GenerationOutput:
    """Speculative decoding: the output follows exactly what `generate(target_model, ...)`
    samples with the same config (and greedy rows are token-for-token identical).

    Args and result as `generate`, plus `draft_model` (same vocabulary) and
    `num_speculative_tokens` (K, drafts per round). `GenerationOutput.num_drafted` and
    `.num_accepted` count the draft tokens proposed and accepted per row. `processors`
    (any stateful chain) process both the draft's q and the target's p. `output_args`: the
    keyword arguments of `generate` for stops, samples and logprobs (`stop_token_ids`,
    `stop_sequences`, `num_samples`, `logprobs_mode`, `num_top_logprobs`); logprobs come from
    the target's processed p, so they equal what `generate` reports for the same tokens.
    """
    check_num_speculative_tokens(num_speculative_tokens)
    target_vocab, draft_vocab = vocab_size(target_model), vocab_size(draft_model)
    if target_vocab != draft_vocab:
        raise ValueError(
            f"draft_model's vocabulary ({draft_vocab}) differs from target_model's ({target_vocab})"
        )
    return run_speculative(
        DraftModel(),
        (target_model, draft_model),
        target_model,
        prompt_tokens,
        key=key,
        config=config,
        max_new_tokens=max_new_tokens,
        num_speculative_tokens=num_speculative_tokens,
        prompt_lengths=prompt_lengths,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        processors=processors,
        **output_args,
    )


def run_speculative(
    drafting: Drafting,
    models,
    target_model,
    prompt_tokens,
    *,
    key,
    config,
    max_new_tokens,
    num_speculative_tokens,
    prompt_lengths,
    eos_token_id,
    pad_token_id,
    processors,
    stop_token_ids=None,
    stop_sequences=None,
    num_samples: int = 1,
    logprobs_mode: str = "processed",
    num_top_logprobs: int = 0,
) -> GenerationOutput:
    """The Python boundary the speculative decoders share: checks, then the loop."""
    config = with_eos(config, eos_token_id, stop_token_ids)
    check_output_args(logprobs_mode, num_top_logprobs, num_samples)
    limits, width = new_token_limits(max_new_tokens, prompt_tokens)
    prompt, lengths, _ = check_generation_args(
        target_model,
        prompt_tokens,
        prompt_lengths,
        width,
        config,
        num_speculative_tokens,
        "the K speculative tokens",
        pad_token_id=pad_token_id,
    )
    if prompt.shape[0] == 0:
        raise ValueError("speculative decoding needs at least one prompt row, got a batch of 0")
    stops = stop_sequences_array(stop_sequences, prompt.shape[0])
    prompt, lengths, config, stops = expand_samples(num_samples, prompt, lengths, config, stops)
    max_length = getattr(target_model, "max_length", None)
    prompt, output_bucket, cache_length = bucketed_prompt(prompt, width, max_length, num_speculative_tokens)
    out = speculative_loop(
        as_processor(processors),
        drafting,
        models,
        prompt,
        lengths,
        key,
        config,
        pad_token_id,
        stops,
        jnp.asarray(np.repeat(limits, num_samples)),
        num_speculative_tokens=num_speculative_tokens,
        max_new_tokens=output_bucket,
        cache_length=cache_length,
        logprobs_mode=logprobs_mode,
        num_top_logprobs=num_top_logprobs,
    )
    return trim(out, width)


@struct.dataclass
class SpeculativeState:
    """The carry of the speculative loop (one iteration = one round)."""

    round: jax.Array  # [] int32
    caches: Any  # the drafting strategy's caches
    processor_state: Any  # the processors' state after every emitted token (leaves [B, ...])
    last: jax.Array  # [B] the last emitted token, not yet fed to the models
    position: jax.Array  # [B] its position
    emitted: jax.Array  # [B] tokens emitted so far
    done: jax.Array  # [B] bool: a stop emitted or the output is full
    tokens: jax.Array  # [B, N] the output
    logprobs: jax.Array  # [B, N] float32
    top_ids: jax.Array  # [B, N, k] int32
    top_logprobs: jax.Array  # [B, N, k] float32
    num_drafted: jax.Array  # [B] draft tokens proposed
    num_accepted: jax.Array  # [B] draft tokens accepted


@functools.partial(
    jax.jit,
    static_argnames=(
        "processors",
        "drafting",
        "num_speculative_tokens",
        "max_new_tokens",
        "cache_length",
        "logprobs_mode",
        "num_top_logprobs",
    ),
)
def speculative_loop(
    processors,
    drafting: Drafting,
    models,
    prompt,
    lengths,
    key,
    config,
    pad_token_id,
    stop_sequences,
    limits,
    *,
    num_speculative_tokens,
    max_new_tokens,
    cache_length,
    logprobs_mode,
    num_top_logprobs,
) -> GenerationOutput:
    """The shared speculative decode loop (see module docstring)."""
    k = num_speculative_tokens
    batch, prompt_len = prompt.shape
    rows = jnp.arange(batch)
    logits, caches = drafting.prefill(models, prompt, cache_length)
    logits = last_prompt_logits(logits, lengths)
    stop_ids = config.stop_ids(batch)  # [B, S]
    every_row = jnp.ones(batch, bool)
    processor_state = processors.init(prompt, lengths, logits.shape[-1], config)
    width, top_k = max_new_tokens, num_top_logprobs
    zeros = jnp.zeros(batch, jnp.int32)

    # The first new token comes straight from the target's prefill logits.
    first = sample_tokens(
        jax.random.fold_in(key, 0), logits, config, processors, processor_state, None, logprobs_mode, top_k
    )
    no_drafts = jnp.zeros((batch, 0), jnp.int32)
    empty = jnp.full((batch, width), pad_token_id, jnp.int32)
    out = emit_accepted(
        empty, zeros, first.token, zeros.astype(bool), no_drafts, zeros, first.token, stop_ids, pad_token_id,
        stop_sequences, limits,
    )  # fmt: skip
    init = SpeculativeState(
        round=jnp.ones((), jnp.int32),
        caches=caches,
        processor_state=processors.update(processor_state, first.token, every_row, config),
        last=first.token,
        position=lengths,
        emitted=out.count,
        done=out.done,
        tokens=out.tokens,
        logprobs=write_rows(jnp.zeros((batch, width)), zeros, first.logprob[:, None], out.count),
        top_ids=write_rows(
            jnp.full((batch, width, top_k), pad_token_id, jnp.int32), zeros, first.top_ids[:, None], out.count
        ),
        top_logprobs=write_rows(
            jnp.zeros((batch, width, top_k)), zeros, first.top_logprobs[:, None], out.count
        ),
        num_drafted=zeros,
        num_accepted=zeros,
    )

    def one_round(s: SpeculativeState) -> SpeculativeState:
        draft_key, accept_key, resample_key = jax.random.split(jax.random.fold_in(key, s.round), 3)
        # drafts [B, K], q [B, K, V], states: leaves [B, K+1, ...]
        context = Round(s.last, s.position, s.processor_state, prompt, lengths, s.tokens, s.emitted)
        proposal = drafting.propose(models, s.caches, context, draft_key, processors, config, k)
        drafts, q, states = proposal.drafts, proposal.q, proposal.states

        verify_tokens = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [B, K+1]
        verify_positions = s.position[:, None] + jnp.arange(k + 1)[None]
        logits, caches = drafting.verify(
            models, proposal.caches, verify_tokens, verify_positions, proposal.saved
        )
        # p_j is processed with the state after drafts < j, as q_j was: all K+1 positions as rows.
        flat_states = jax.tree.map(lambda x: x.reshape(batch * (k + 1), *x.shape[2:]), states)
        processed = processors.process(
            logits.reshape(batch * (k + 1), -1).astype(jnp.float32), config.repeat_rows(k + 1), flat_states
        )
        p = probabilities(processed).reshape(batch, k + 1, -1)
        num_accepted, next_token = verify_drafts(
            row_keys(accept_key, config, batch), row_keys(resample_key, config, batch), p, q, drafts
        )
        out = emit_accepted(
            s.tokens, s.emitted, s.last, s.done, drafts, num_accepted, next_token, stop_ids, pad_token_id,
            stop_sequences, limits,
        )  # fmt: skip
        # What the outputs record of the emitted tokens: drafts[:a] then next_token, from the
        # target's processed p (or its raw logits) at their positions.
        slot = jnp.arange(k + 1)[None]
        new = jnp.where(slot < num_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
        new = jnp.clip(new, 0, logits.shape[-1] - 1).reshape(-1)
        logprob, top_ids, top_logprobs = record(
            logits.reshape(batch * (k + 1), -1), processed, new, logprobs_mode, top_k
        )
        rows_of = functools.partial(jnp.reshape, shape=(batch, k + 1, -1))
        # Rows that go on wrote every accepted draft and next_token; the others are done.
        accepted_state = jax.tree.map(lambda x: x[rows, num_accepted], states)
        active = ~s.done
        return SpeculativeState(
            round=s.round + 1,
            caches=caches,
            processor_state=processors.update(accepted_state, next_token, ~out.done, config),
            last=out.last,
            position=s.position + out.count,
            emitted=s.emitted + out.count,
            done=out.done,
            tokens=out.tokens,
            logprobs=write_rows(s.logprobs, s.emitted, logprob.reshape(batch, k + 1), out.count),
            top_ids=write_rows(s.top_ids, s.emitted, rows_of(top_ids), out.count),
            top_logprobs=write_rows(s.top_logprobs, s.emitted, rows_of(top_logprobs), out.count),
            num_drafted=s.num_drafted + k * active,
            num_accepted=s.num_accepted + num_accepted * active,
        )

    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), one_round, init)
    return outputs(final, top_k, num_drafted=final.num_drafted, num_accepted=final.num_accepted)
