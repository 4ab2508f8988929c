"""Lossless, batched speculative decoding with a draft model, as one compiled program.

Each round (one `lax.while_loop` iteration): the drafter proposes K tokens (`lax.scan`),
the target scores all K+1 positions in one forward pass, and `verify_drafts` accepts a
prefix per row. Rows advance by their own accepted counts: positions and output offsets
are per row, and rejected cache entries are simply overwritten later through positions.

The loop is written once over a `Drafting` strategy (prefill / draft step / verify pass);
the draft-model strategy lives here, the early-exit one in `self_speculative.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.decoding.loop import (
    GenerationOutput,
    add_tokens,
    check_generation_args,
    last_prompt_logits,
    output_lengths,
    prompt_history,
    sample_next,
    with_eos,
)
from rtdlm.decoding.verify import verify_drafts
from rtdlm.sampling import SamplingConfig, SamplingState, draw, probabilities, process_logits, row_keys


class Drafting:
    """How a speculative decoder drafts and verifies; `models` and `caches` are PyTrees.

    draft(models, caches, tokens [B, 1], positions [B, 1]) -> (logits [B, V], caches, saved)
      feeds one token, returns the next-token logits and anything the verify pass may
      reuse (`saved`, stacked over the K draft steps).
    verify(models, caches, tokens [B, K+1], positions [B, K+1], saved) -> (logits [B, K+1, V], caches)
      scores the round's last token and its K drafts. Afterwards the drafter must have seen
      every token up to the last draft, so the next round feeds it only the new last token.
    """

    def prefill(self, models, prompt, positions, cache_length) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def draft(self, models, caches, tokens, positions):
        raise NotImplementedError

    def verify(self, models, caches, tokens, positions, saved):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DraftModel(Drafting):
    """models = (target, draft); caches = (target cache, draft cache)."""

    def prefill(self, models, prompt, positions, cache_length):
        target, drafter = models
        batch = prompt.shape[0]
        logits, target_cache = target(prompt, positions, target.init_cache(batch, cache_length))
        _, draft_cache = drafter(prompt, positions, drafter.init_cache(batch, cache_length))
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


def vocab_size(model) -> int:
    """`model.vocab_size` if it is an int, else from one abstract (shape-only) forward pass."""
    if isinstance(getattr(model, "vocab_size", None), int):
        return model.vocab_size
    one = jnp.zeros((1, 1), jnp.int32)
    shape = jax.eval_shape(lambda m: m(one, one, m.init_cache(1, 1))[0], model)
    return shape.shape[-1]


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
) -> GenerationOutput:
    """Speculative decoding: the output follows exactly what `generate(target_model, ...)`
    samples with the same config (and greedy rows are token-for-token identical).

    Args and result as `generate`, plus `draft_model` (same vocabulary) and
    `num_speculative_tokens` (K, drafts per round). `GenerationOutput.num_drafted` and
    `.num_accepted` count the draft tokens proposed and accepted per row.
    """
    check_num_speculative_tokens(num_speculative_tokens)
    target_vocab, draft_vocab = vocab_size(target_model), vocab_size(draft_model)
    if target_vocab != draft_vocab:
        raise ValueError(
            f"draft_model's vocabulary ({draft_vocab}) differs from target_model's ({target_vocab})"
        )
    prompt, lengths, cache_length = check_generation_args(
        target_model, prompt_tokens, prompt_lengths, max_new_tokens, config, num_speculative_tokens
    )
    return speculative_loop(
        DraftModel(),
        (target_model, draft_model),
        prompt,
        lengths,
        key,
        with_eos(config, eos_token_id),
        pad_token_id,
        num_speculative_tokens=num_speculative_tokens,
        max_new_tokens=max_new_tokens,
        cache_length=cache_length,
    )


@functools.partial(
    jax.jit, static_argnames=("drafting", "num_speculative_tokens", "max_new_tokens", "cache_length")
)
def speculative_loop(
    drafting: Drafting,
    models,
    prompt,
    lengths,
    key,
    config,
    pad_token_id,
    *,
    num_speculative_tokens,
    max_new_tokens,
    cache_length,
) -> GenerationOutput:
    """The shared speculative decode loop (see module docstring)."""
    k = num_speculative_tokens
    batch, prompt_len = prompt.shape
    rows = jnp.arange(batch)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, caches = drafting.prefill(models, prompt, positions, cache_length)
    logits = last_prompt_logits(logits, lengths)
    eos = jnp.broadcast_to(jnp.asarray(config.eos_token_id, jnp.int32), (batch,))
    counts = prompt_history(prompt, lengths, logits.shape[-1])

    # The first new token comes straight from the target's prefill logits.
    first = sample_next(jax.random.fold_in(key, 0), logits, config, counts, jnp.zeros(batch, jnp.int32))
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    zeros = jnp.zeros(batch, jnp.int32)
    # Round state: (round, caches, history counts [B, V], last emitted token, not yet
    #   fed to the models [B], its position [B], tokens emitted [B], finished [B],
    #   output [B, N], drafted [B], accepted [B])
    state = (
        1,
        caches,
        add_tokens(counts, first, jnp.ones(batch, bool)),
        first,
        lengths,
        jnp.ones(batch, jnp.int32),
        (first == eos) | (max_new_tokens == 1),
        out,
        zeros,
        zeros,
    )

    def draft_round(caches, last, position, counts, draft_key, emitted):
        """K drafts, one token fed per step (`last`, then each draft)."""

        def step(carry, j):
            caches, previous, counts = carry
            logits, caches, saved = drafting.draft(models, caches, previous[:, None], (position + j)[:, None])
            processed = process_logits(logits, config, state=SamplingState(counts, emitted + j))
            q = probabilities(processed)  # [B, V], the distribution draft j is drawn from
            drafted = draw(row_keys(jax.random.fold_in(draft_key, j), config, batch), q)
            counts_after = add_tokens(counts, drafted, jnp.ones(batch, bool))
            return (caches, drafted, counts_after), (drafted, q, counts, saved)

        (caches, _, counts), stacked = jax.lax.scan(step, (caches, last, counts), jnp.arange(k))
        return caches, counts, stacked

    def one_round(state):
        r, caches, counts, last, position, emitted, done, out, drafted_n, accepted_n = state
        round_key = jax.random.fold_in(key, r)
        draft_key, accept_key, resample_key = jax.random.split(round_key, 3)
        caches, counts_all, (drafts, q, draft_counts, saved) = draft_round(
            caches, last, position, counts, draft_key, emitted
        )
        drafts, q = drafts.T, jnp.swapaxes(q, 0, 1)  # [B, K], [B, K, V]

        verify_tokens = jnp.concatenate([last[:, None], drafts], axis=1)  # [B, K+1]
        verify_positions = position[:, None] + jnp.arange(k + 1)[None]
        logits, caches = drafting.verify(models, caches, verify_tokens, verify_positions, saved)
        # p_j sees the history plus drafts before j: the draft steps' counts, then all K.
        history = jnp.concatenate([draft_counts, counts_all[None]], axis=0)  # [K+1, B, V]
        history = jnp.swapaxes(history, 0, 1).reshape(batch * (k + 1), -1)
        processed = process_logits(
            logits.reshape(batch * (k + 1), -1).astype(jnp.float32),
            config.repeat_rows(k + 1),
            state=SamplingState(history, (emitted[:, None] + jnp.arange(k + 1)[None]).reshape(-1)),
        )
        p = probabilities(processed).reshape(batch, k + 1, -1)
        num_accepted, next_token = verify_drafts(
            row_keys(accept_key, config, batch), row_keys(resample_key, config, batch), p, q, drafts
        )

        # Emit drafts[:a] then next_token, cut after an EOS and at max_new_tokens.
        slot = jnp.arange(k + 1)[None]  # [1, K+1]
        new = jnp.where(slot < num_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
        new = jnp.where(slot <= num_accepted[:, None], new, pad_token_id)
        is_eos = (new == eos[:, None]) & (slot <= num_accepted[:, None])
        upto_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, num_accepted + 1)
        count = jnp.where(done, 0, jnp.minimum(upto_eos, max_new_tokens - emitted))  # [B]
        write = slot < count[:, None]
        out = out.at[rows[:, None], jnp.where(write, emitted[:, None] + slot, max_new_tokens)].set(
            new, mode="drop"
        )
        counts = counts.at[rows[:, None], new].add(write.astype(counts.dtype))
        last_index = jnp.maximum(count - 1, 0)
        new_last = jnp.where(count > 0, new[rows, last_index], last)
        active = ~done
        done = done | jnp.any(is_eos & write, 1) | (emitted + count >= max_new_tokens)
        return (
            r + 1,
            caches,
            counts,
            new_last,
            position + count,
            emitted + count,
            done,
            out,
            drafted_n + k * active,
            accepted_n + num_accepted * active,
        )

    state = jax.lax.while_loop(lambda s: ~jnp.all(s[6]), one_round, state)
    out = state[7]
    return GenerationOutput(out, output_lengths(out, eos), state[8], state[9])


class DecoderFacade:
    """What the guide's decoder facades share: K, a default config and a PRNG key stream
    (each `generate` call without a `key` takes the next one, so calls differ but replay)."""

    def __init__(self, num_speculative_tokens: int, config: SamplingConfig | None, seed: int):
        check_num_speculative_tokens(num_speculative_tokens)
        self.num_speculative_tokens = num_speculative_tokens
        self.config = SamplingConfig() if config is None else config
        self._key = jax.random.key(seed)

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 100,
        *,
        config: SamplingConfig | None = None,
        key: jax.Array | None = None,
        **kwargs,
    ) -> GenerationOutput:
        """Generates `max_new_tokens` after `input_ids` ([B, P] or [P]); extra keyword
        arguments (`prompt_lengths`, `eos_token_id`, ...) go to the decoding function."""
        if key is None:
            self._key, key = jax.random.split(self._key)
        return self._decode(
            input_ids,
            key=key,
            config=config or self.config,
            max_new_tokens=max_new_tokens,
            num_speculative_tokens=self.num_speculative_tokens,
            **kwargs,
        )

    def _decode(self, input_ids, **kwargs) -> GenerationOutput:
        raise NotImplementedError


class SpeculativeDecoder(DecoderFacade):
    """The guide's facade for draft-model speculative decoding.

    Example:
        >>> speculative = SpeculativeDecoder(target_model=main_model, draft_model=draft_model,
        ...                                  num_speculative_tokens=4)
        >>> output = speculative.generate(input_ids, max_new_tokens=100)
        >>> output.tokens, output.num_accepted / output.num_drafted
    """

    def __init__(
        self,
        target_model,
        draft_model,
        num_speculative_tokens: int = 4,
        config: SamplingConfig | None = None,
        seed: int = 0,
    ):
        super().__init__(num_speculative_tokens, config, seed)
        self.target_model, self.draft_model = target_model, draft_model

    def _decode(self, input_ids, **kwargs) -> GenerationOutput:
        return speculative_generate(self.target_model, self.draft_model, input_ids, **kwargs)
