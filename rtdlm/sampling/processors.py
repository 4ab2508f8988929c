"""Logits processors: pure functions `(logits [B, V], config, state) -> logits [B, V]`.

They compose like optax transformations (`chain(...)`), and `DEFAULT_PROCESSORS` applies
them in Hugging Face transformers' order: logit bias, banned tokens, the min-new-tokens EOS
mask, repetition penalty, presence/frequency penalties, temperature, then the truncation
filters (top-k, top-p, min-p, typical-p) and greedy selection (`filters.truncate`).

A processor reads the per-row history from `SamplingState.token_counts` ([B, V] counts of
each token seen so far, prompt included), never from a list of past tokens, so the decode
loop can keep O(B·V) state and update it in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rtdlm.sampling.config import SamplingConfig
from rtdlm.sampling.filters import truncate
from rtdlm.sampling.vocab import Vocab


class SamplingState(NamedTuple):
    """What processors may know about the past, per row."""

    token_counts: jax.Array | None = None  # [B, V] int32: occurrences in the history
    num_generated: jax.Array | None = None  # [B] int32: new tokens so far (min_new_tokens)


NO_HISTORY = SamplingState()

Processor = Callable[[jax.Array, SamplingConfig, SamplingState], jax.Array]


def per_row(value, batch: int, dtype=None) -> jax.Array:
    """A config field (scalar or [B]) as a [B] array."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def token_counts(token_history: jax.Array, vocab_size: int, first_id=0) -> jax.Array:
    """[B, H] token ids (-1 = padding, ignored) -> [B, V] int32 counts of ids
    `first_id .. first_id + V - 1` (a vocabulary shard's block; 0: the whole vocabulary)."""
    batch = token_history.shape[0]
    ids = _local_ids(token_history, vocab_size, first_id)
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, vocab_size), jnp.int32).at[rows, ids].add(1, mode="drop")


def _local_ids(ids, vocab_size, first_id):
    """Token ids -> indices into a vocabulary block; padding (< 0) and ids outside the block
    map to `vocab_size`, which scatters with mode="drop" ignore."""
    local = ids - first_id
    return jnp.where((ids < 0) | (local < 0) | (local >= vocab_size), vocab_size, local)


def _scatter_rows(logits, config, ids, update):
    """Applies `update(logits[b, ids[b, j]])` for ids [N] or [B, N]; ids < 0 are padding."""
    batch, vocab = logits.shape
    ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (batch, jnp.shape(ids)[-1]))
    ids = _local_ids(ids, vocab, Vocab(config.vocab_axis).offset(vocab))
    return update(logits.at[jnp.arange(batch)[:, None], ids], ids)


def apply_logit_bias(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Adds `config.logit_bias` ({token: bias}) to the logits."""
    if config.logit_bias is None:
        return logits
    token_ids, biases = config.logit_bias
    biases = jnp.asarray(biases, logits.dtype)
    return _scatter_rows(
        logits, config, token_ids, lambda at, ids: at.add(jnp.broadcast_to(biases, ids.shape), mode="drop")
    )


def mask_banned_tokens(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Sets `config.banned_token_ids` to -inf."""
    if config.banned_token_ids is None:
        return logits
    return _scatter_rows(logits, config, config.banned_token_ids, lambda at, _: at.set(-jnp.inf, mode="drop"))


def mask_eos_before_min_new_tokens(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Masks `config.eos_token_id` while fewer than `config.min_new_tokens` were generated."""
    batch, vocab = logits.shape
    generated = state.num_generated if state.num_generated is not None else jnp.zeros(batch, jnp.int32)
    too_early = per_row(generated, batch) < per_row(config.min_new_tokens, batch)
    eos = per_row(config.eos_token_id, batch, jnp.int32)
    is_eos = Vocab(config.vocab_axis).token_ids(vocab)[None] == eos[:, None]  # eos -1 matches nothing
    return jnp.where(is_eos & too_early[:, None], -jnp.inf, logits)


def apply_repetition_penalty(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """HF rule on every token seen: negative logits times the penalty, positive ones divided."""
    if state.token_counts is None:
        return logits
    penalty = per_row(config.repetition_penalty, logits.shape[0], jnp.float32)[:, None]
    penalty = jnp.where(penalty > 0, penalty, 1.0)
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(state.token_counts > 0, penalised, logits)


def apply_presence_frequency_penalties(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """OpenAI rule: `logit - presence * [count > 0] - frequency * count`."""
    if state.token_counts is None:
        return logits
    batch = logits.shape[0]
    presence = per_row(config.presence_penalty, batch, jnp.float32)[:, None]
    frequency = per_row(config.frequency_penalty, batch, jnp.float32)[:, None]
    counts = state.token_counts.astype(jnp.float32)
    return logits - presence * (counts > 0) - frequency * counts


def is_greedy(config: SamplingConfig, batch: int) -> jax.Array:
    """[B] bool: rows that take the argmax (temperature <= 0 or NaN, or do_sample False)."""
    temperature = per_row(config.temperature, batch, jnp.float32)
    return ~(temperature > 0) | ~per_row(config.do_sample, batch, jnp.bool_)


def apply_temperature(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Divides by the temperature (greedy rows are left as they are)."""
    batch = logits.shape[0]
    temperature = per_row(config.temperature, batch, jnp.float32)
    temperature = jnp.where(is_greedy(config, batch), 1.0, temperature)
    return logits / temperature[:, None]


def _truncation(logits, config, **params):
    batch = logits.shape[0]
    defaults = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, greedy=False)
    args = {name: per_row(params.get(name, default), batch) for name, default in defaults.items()}
    return truncate(logits, num_candidates=config.num_candidates, vocab_axis=config.vocab_axis, **args)


def apply_truncation(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """top-k, top-p, min-p and typical-p in one exact, sort-free pass; greedy rows keep argmax."""
    return _truncation(
        logits,
        config,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        typical_p=config.typical_p,
        greedy=is_greedy(config, logits.shape[0]),
    )


def filter_top_k(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Keeps the `top_k` largest logits (ties with the k-th kept)."""
    return _truncation(logits, config, top_k=config.top_k)


def filter_top_p(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Keeps the smallest set of most probable tokens whose mass reaches `top_p`."""
    return _truncation(logits, config, top_p=config.top_p)


def filter_min_p(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Keeps tokens with probability >= `min_p` times the top token's."""
    return _truncation(logits, config, min_p=config.min_p)


def filter_typical_p(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
    """Locally typical sampling: tokens closest to the entropy, up to mass `typical_p`."""
    return _truncation(logits, config, typical_p=config.typical_p)


def chain(*processors: Processor) -> Processor:
    """Composes processors left to right, like `optax.chain`."""

    def apply(logits, config: SamplingConfig, state: SamplingState = NO_HISTORY):
        for processor in processors:
            logits = processor(logits, config, state)
        return logits

    return apply


DEFAULT_PROCESSORS: Processor = chain(
    apply_logit_bias,
    mask_banned_tokens,
    mask_eos_before_min_new_tokens,
    apply_repetition_penalty,
    apply_presence_frequency_penalties,
    apply_temperature,
    apply_truncation,
)
