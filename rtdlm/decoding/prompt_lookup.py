"""Prompt-lookup (n-gram) speculative decoding: the context drafts, the model verifies.

No draft model: each round, every row looks up the most recent earlier occurrence of its
last `ngram_size` tokens (falling back to shorter n-grams, down to one token) in its
prompt + output so far, and drafts the K tokens that followed it. Code editing,
summaries and retrieval answers copy long spans of their prompt, and those spans are then
drafted at almost no cost (Saxena 2023, Hugging Face's `prompt_lookup_num_tokens`,
vLLM's `ngram` speculator).

The drafts are fixed tokens, so q is a point mass: verification accepts draft x with
probability p(x) and otherwise draws from p with x removed, which keeps the output
exactly `generate`'s (greedy rows token for token). The search is a few compare/max
passes over the [B, P + N] context on the device, inside the same compiled loop as the
verify passes (`speculative_loop`); a row without a match drafts nothing useful that
round and advances by the target's token alone; a round in which no row matched two or
more tokens runs a one-token pass (one-token matches are drafted only alongside better ones).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.decoding.common import GenerationOutput, cond_in_place, vocab_size
from rtdlm.decoding.model import prefill_prompt
from rtdlm.decoding.speculative import (
    Drafting,
    Proposal,
    Round,
    advance_states,
    check_num_speculative_tokens,
    run_speculative,
)
from rtdlm.sampling import DEFAULT_PROCESSORS, Processor, SamplingConfig

NO_DRAFT = -1  # a draft id outside [0, V): never accepted, never emitted


def context_tokens(prompt, prompt_lengths, tokens, emitted):
    """Each row's prompt then its output so far, left-aligned.

    prompt [B, P] (right-padded), prompt_lengths [B], tokens [B, N] (output), emitted [B]
    -> (context [B, P + N] int32, -1 after each row's end; length [B] = prompt_lengths + emitted).
    """
    width = prompt.shape[1] + tokens.shape[1]
    index = jnp.arange(width)[None]  # [1, P + N]
    lengths = prompt_lengths[:, None]
    from_output = jnp.take_along_axis(tokens, jnp.clip(index - lengths, 0, tokens.shape[1] - 1), axis=1)
    from_prompt = jnp.pad(prompt, ((0, 0), (0, tokens.shape[1])))
    context = jnp.where(index < lengths, from_prompt, from_output)
    length = prompt_lengths + emitted
    return jnp.where(index < length[:, None], context, NO_DRAFT), length


def lookup_drafts(context, length, ngram_size: int, num_drafts: int):
    """Drafts from the most recent earlier occurrence of each row's last n tokens.

    context [B, T] int32 (row b's tokens in [:length[b]]), length [B] >= 1 -> drafts
    [B, K] int32 (NO_DRAFT where nothing matched), matched [B] (the n of the match, 0 for
    none). The longest suffix of n <= `ngram_size` tokens that occurred earlier wins; among
    its occurrences the latest. Occurrence ending at e proposes context[e + 1 :]; where the
    occurrence overlaps the suffix (a period d = length - 1 - e shorter than K, as in a run
    of spaces) the copy continues periodically, context[e + 1 + (j mod d)].
    """
    batch, width = context.shape
    rows = jnp.arange(batch)
    ends = jnp.arange(width)[None]  # [1, T] candidate end e of an earlier occurrence
    # An earlier occurrence ends at e <= length - 2: at least one known token follows it.
    match = ends <= (length - 2)[:, None]  # [B, T]
    best_end = jnp.full((batch,), -1, jnp.int32)
    matched = jnp.zeros((batch,), jnp.int32)
    for d in range(ngram_size):
        # Suffix token d back from the end vs the token d back from each candidate end.
        back = length - 1 - d  # [B]
        suffix_token = jnp.where(back >= 0, context[rows, jnp.maximum(back, 0)], -2)  # -2 matches nothing
        shifted = jnp.pad(context, ((0, 0), (d, 0)), constant_values=-2)[:, :width]  # [B, T]: context[e - d]
        match = match & (shifted == suffix_token[:, None])  # the (d+1)-gram ending at e matches
        latest = jnp.max(jnp.where(match, ends, -1), axis=1)  # [B]
        best_end = jnp.where(latest >= 0, latest, best_end)  # longer n-grams override shorter
        matched = jnp.where(latest >= 0, d + 1, matched)
    period = jnp.maximum(length - 1 - best_end, 1)  # [B]
    index = best_end[:, None] + 1 + jnp.arange(num_drafts)[None] % period[:, None]  # [B, K] < length
    drafts = jnp.take_along_axis(context, jnp.clip(index, 0, width - 1), axis=1)
    return jnp.where((best_end >= 0)[:, None], drafts, NO_DRAFT).astype(jnp.int32), matched


@dataclasses.dataclass(frozen=True)
class PromptLookup(Drafting):
    """models = the target; caches = its cache. Drafts by n-gram lookup in the context.

    Token 0 is fed to the verify pass in place of a missing draft (its logits are never
    used: verification stops at the first missing draft). In a round where no row matched
    two or more tokens, nothing is drafted and the verify pass feeds the round's last token
    alone, so a miss costs about one `generate` step.
    """

    ngram_size: int

    def prefill(self, model, prompt, cache_length):
        return prefill_prompt(model, prompt, cache_length)

    def propose(self, model, cache, round: Round, key, processors, config, num_drafts):
        del key  # the drafts are deterministic
        context, length = context_tokens(round.prompt, round.prompt_lengths, round.tokens, round.emitted)
        drafts, matched = lookup_drafts(context, length, self.ngram_size, num_drafts)  # [B, K], [B]
        # A one-token match rarely predicts the next tokens (measured on the bundled model:
        # 0.1-0.3 of K=4 drafts accepted, vs 1.4-1.8 for two tokens and 3.5 for three), and a
        # K+1 pass costs 1.5-3 steps on a CPU: the drafts are verified only in rounds where
        # some row matched at least two tokens (then every row's drafts ride along).
        worth_verifying = jnp.any(matched >= min(2, self.ngram_size))
        drafts = jnp.where(worth_verifying, drafts, NO_DRAFT)
        has_draft = drafts != NO_DRAFT
        fed = jnp.where(has_draft, drafts, 0)  # valid ids for the model and processors
        q = jax.nn.one_hot(fed, vocab_size(model), dtype=jnp.float32)  # [B, K, V] point masses
        states = advance_states(processors, round.processor_state, fed, config)
        return Proposal(cache, drafts, q, states, saved=(fed, worth_verifying))

    def verify(self, model, cache, tokens, positions, saved):
        fed, worth_verifying = saved
        tokens = jnp.concatenate([tokens[:, :1], fed], axis=1)  # [B, K+1]

        def every_token(operand):
            return model(tokens, positions, operand[1])

        def last_token(operand):  # position 0's logits are all that is read: drafts rejected
            logits, cache = model(tokens[:, :1], positions[:, :1], operand[1])
            return jnp.pad(logits, ((0, 0), (0, fed.shape[1]), (0, 0))), cache

        # A miss costs one token's pass, not K+1 (a lax.cond here would copy the cache).
        placeholder = jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(every_token, (None, cache))[0]
        )
        return cond_in_place(worth_verifying, every_token, last_token, (placeholder, cache))


def check_ngram_size(ngram_size) -> None:
    if isinstance(ngram_size, (bool, np.bool_)) or not isinstance(ngram_size, (int, np.integer)):
        raise TypeError(f"ngram_size must be an int, got {ngram_size!r}")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")


def prompt_lookup_generate(
    model,
    prompt_tokens,
    *,
    key: jax.Array,
    config: SamplingConfig,
    max_new_tokens: int,
    num_speculative_tokens: int = 4,
    ngram_size: int = 3,
    prompt_lengths=None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    processors: Processor = DEFAULT_PROCESSORS,
    **output_args,
) -> GenerationOutput:
    """Speculative decoding with drafts looked up in the prompt and output (no draft model).

    Lossless like `speculative_generate`: the output follows exactly what `generate(model,
    ...)` samples with the same config, and greedy rows are token-for-token identical.

    Args and result as `generate`, plus `num_speculative_tokens` (K, drafts per round) and
    `ngram_size` (the longest suffix matched; shorter ones down to 1 are tried when it does
    not occur earlier). `GenerationOutput.num_drafted` counts K per round and row (missing
    drafts included), `.num_accepted` the drafts accepted. `output_args`: the keyword
    arguments of `generate` for stops, samples and logprobs, as in `speculative_generate`
    (logprobs come from the target's processed p).

    Example:
      >>> out = prompt_lookup_generate(model, prompt, key=jax.random.key(0), max_new_tokens=64,
      ...                              config=SamplingConfig(temperature=0.0), ngram_size=3)
    """
    check_num_speculative_tokens(num_speculative_tokens)
    check_ngram_size(ngram_size)
    return run_speculative(
        PromptLookup(int(ngram_size)),
        model,
        model,
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
