"""Logits processors: `LogitsProcessor(init, process, update)` triples, like optax's
`GradientTransformation`, composed with `chain(...)`.

    init(prompt [B, P] int32, prompt_lengths [B] int32, vocab_size, config) -> state
    process(logits [B, V] float32, config, state) -> logits [B, V]
    update(state, tokens [B] int32, active [B] bool, config) -> state

The decode loops call `init` once from the prompt (positions past a row's length and ids
< 0 are padding), `process` before every draw and `update` after it; rows that are not
`active` (finished) keep their state. State is any PyTree whose leaves all have the batch
axis first (`[B, ...]`): the speculative decoders stack and flatten states per drafted
position, and mesh sampling splits them over the batch (and over the vocabulary where a
leaf's last axis is the vocabulary). A plain function `(logits, config, state) -> logits`
is a stateless processor (its state is `()`).

`DEFAULT_PROCESSORS` applies, in Hugging Face transformers' order: logit bias, banned
tokens, the min-new-tokens EOS mask (state: tokens generated per row), repetition penalty
and presence/frequency penalties (state: `[B, V]` counts of each token seen, prompt
included), the n-gram bans of `config.no_repeat_ngram_size` / `config.bad_words_ids`,
temperature, then the truncation filters (top-k, top-p, min-p, typical-p) and greedy
selection (`filters.truncate`).

A processor is a static argument of the compiled loops: build it once (the factories here
return equal processors for equal arguments), and new config values never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.sampling.config import SamplingConfig
from rtdlm.sampling.filters import Truncation, truncate, truncation
from rtdlm.sampling.vocab import Vocab


class LogitsProcessor(NamedTuple):
    """A stateful logits processor: pure `init`, `process` and `update` functions."""

    init: Callable[..., Any]  # (prompt [B, P], prompt_lengths [B], vocab_size, config) -> state
    process: Callable[..., jax.Array]  # (logits [B, V], config, state) -> logits [B, V]
    update: Callable[..., Any]  # (state, tokens [B], active [B], config) -> state


Processor = LogitsProcessor | Callable[[jax.Array, SamplingConfig, Any], jax.Array]


def _no_state(prompt, prompt_lengths, vocab_size, config):
    return ()


def _same_state(state, tokens, active, config):
    return state


def as_processor(processor: Processor) -> LogitsProcessor:
    """A `LogitsProcessor` as it is; a plain `(logits, config, state)` function as a
    stateless one."""
    if isinstance(processor, LogitsProcessor):
        return processor
    if callable(processor):
        return LogitsProcessor(_no_state, processor, _same_state)
    raise TypeError(f"processors must be a LogitsProcessor or a function, got {processor!r}")


# Frozen dataclasses, not closures, so chains of equal members compare equal and hash alike:
# a processor is a static argument, and equal ones share one compiled program.
@dataclasses.dataclass(frozen=True)
class _ChainInit:
    members: tuple[LogitsProcessor, ...]

    def __call__(self, prompt, prompt_lengths, vocab_size, config):
        return tuple(m.init(prompt, prompt_lengths, vocab_size, config) for m in self.members)


@dataclasses.dataclass(frozen=True)
class _ChainProcess:
    members: tuple[LogitsProcessor, ...]

    def __call__(self, logits, config, state):
        for member, member_state in zip(self.members, state, strict=True):
            logits = member.process(logits, config, member_state)
        return logits


@dataclasses.dataclass(frozen=True)
class _ChainUpdate:
    members: tuple[LogitsProcessor, ...]

    def __call__(self, state, tokens, active, config):
        return tuple(m.update(s, tokens, active, config) for m, s in zip(self.members, state, strict=True))


def chain(*processors: Processor) -> LogitsProcessor:
    """Composes processors left to right, like `optax.chain`; state = tuple of states."""
    members = tuple(as_processor(p) for p in processors)
    return LogitsProcessor(_ChainInit(members), _ChainProcess(members), _ChainUpdate(members))


def init_from_history(processor: Processor, token_history, vocab_size: int, config: SamplingConfig):
    """A processor's state for `[B, H]` previously seen ids (-1 = padding), read as the
    context of the next draw: what `sample(..., token_history=...)` uses."""
    history = jnp.asarray(token_history, jnp.int32)
    lengths = jnp.full(history.shape[:1], history.shape[1], jnp.int32)
    return as_processor(processor).init(history, lengths, vocab_size, config)


# ---- helpers ---------------------------------------------------------------------------------
def per_row(value, batch: int, dtype=None) -> jax.Array:
    """A config field (scalar or [B]) as a [B] array."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def prompt_ids(prompt: jax.Array, prompt_lengths: jax.Array) -> jax.Array:
    """[B, P] prompt with the positions past each row's length set to -1 (padding)."""
    in_prompt = jnp.arange(prompt.shape[1])[None] < prompt_lengths[:, None]
    return jnp.where(in_prompt, prompt, -1).astype(jnp.int32)


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


def mask_token_ids(logits, config: SamplingConfig, ids) -> jax.Array:
    """Sets `ids` ([N] or [B, N] global token ids, < 0 = none) to -inf in [B, V] logits
    (this device's block when the vocabulary is sharded)."""
    return _scatter_rows(logits, config, ids, lambda at, _: at.set(-jnp.inf, mode="drop"))


# ---- stateless processors --------------------------------------------------------------------
def apply_logit_bias(logits, config: SamplingConfig, state=()):
    """Adds `config.logit_bias` ({token: bias}) to the logits."""
    if config.logit_bias is None:
        return logits
    token_ids, biases = config.logit_bias
    biases = jnp.asarray(biases, logits.dtype)
    return _scatter_rows(
        logits, config, token_ids, lambda at, ids: at.add(jnp.broadcast_to(biases, ids.shape), mode="drop")
    )


def mask_banned_tokens(logits, config: SamplingConfig, state=()):
    """Sets `config.banned_token_ids` to -inf."""
    if config.banned_token_ids is None:
        return logits
    return mask_token_ids(logits, config, config.banned_token_ids)


def is_greedy(config: SamplingConfig, batch: int) -> jax.Array:
    """[B] bool: rows that take the argmax (temperature <= 0 or NaN, or do_sample False)."""
    temperature = per_row(config.temperature, batch, jnp.float32)
    return ~(temperature > 0) | ~per_row(config.do_sample, batch, jnp.bool_)


def apply_temperature(logits, config: SamplingConfig, state=()):
    """Divides by the temperature (greedy rows are left as they are). Inside `jit` an inf
    temperature is clamped to the largest float32: a uniform row over the kept tokens."""
    batch = logits.shape[0]
    temperature = per_row(config.temperature, batch, jnp.float32)
    temperature = jnp.where(
        is_greedy(config, batch), 1.0, jnp.minimum(temperature, jnp.finfo(jnp.float32).max)
    )
    return logits / temperature[:, None]


def _truncation(logits, config, **params):
    batch = logits.shape[0]
    defaults = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, greedy=False)
    args = {name: per_row(params.get(name, default), batch) for name, default in defaults.items()}
    return truncate(
        logits,
        num_candidates=config.num_candidates,
        vocab_axis=config.vocab_axis,
        min_tokens_to_keep=per_row(config.min_tokens_to_keep, batch, jnp.int32),
        **args,
    )


def _config_filters(config: SamplingConfig, batch: int) -> dict[str, jax.Array]:
    return dict(
        top_k=per_row(config.top_k, batch),
        top_p=per_row(config.top_p, batch),
        min_p=per_row(config.min_p, batch),
        typical_p=per_row(config.typical_p, batch),
        greedy=is_greedy(config, batch),
        num_candidates=config.num_candidates,
        min_tokens_to_keep=per_row(config.min_tokens_to_keep, batch, jnp.int32),
    )


def apply_truncation(logits, config: SamplingConfig, state=()):
    """top-k, top-p, min-p and typical-p in one exact, sort-free pass; greedy rows keep argmax."""
    return truncate(logits, vocab_axis=config.vocab_axis, **_config_filters(config, logits.shape[0]))


def config_truncation(logits, config: SamplingConfig) -> Truncation:
    """`apply_truncation`'s work on `[B, V]` logits before it is applied,
    for a sampler that draws from its candidates (`sampler.sample_truncation`)."""
    return truncation(logits, vocab_axis=config.vocab_axis, **_config_filters(config, logits.shape[0]))


def _unchanged(logits, config, state):
    return logits


@dataclasses.dataclass(frozen=True)
class _UntruncatedChain:
    members: tuple[LogitsProcessor, ...]
    last: Callable[..., jax.Array]  # the last member's process, itself untruncated

    def __call__(self, logits, config, state):
        for member, member_state in zip(self.members[:-1], state[:-1], strict=True):
            logits = member.process(logits, config, member_state)
        return self.last(logits, config, state[-1])


def untruncated(processor: Processor) -> Callable[..., jax.Array] | None:
    """The processor's `process` without its final `apply_truncation` (same state), or None
    when it does not end with it. `DEFAULT_PROCESSORS` does: the sampler then applies the
    truncation itself and can draw from its candidates instead of the whole row."""
    process = as_processor(processor).process
    if process is apply_truncation:
        return _unchanged
    if isinstance(process, _ChainProcess) and process.members:
        last = untruncated(process.members[-1])
        if last is not None:
            return _UntruncatedChain(process.members, last)
    return None


def filter_top_k(logits, config: SamplingConfig, state=()):
    """Keeps the `top_k` largest logits (ties with the k-th kept)."""
    return _truncation(logits, config, top_k=config.top_k)


def filter_top_p(logits, config: SamplingConfig, state=()):
    """Keeps the smallest set of most probable tokens whose mass reaches `top_p`."""
    return _truncation(logits, config, top_p=config.top_p)


def filter_min_p(logits, config: SamplingConfig, state=()):
    """Keeps tokens with probability >= `min_p` times the top token's."""
    return _truncation(logits, config, min_p=config.min_p)


def filter_typical_p(logits, config: SamplingConfig, state=()):
    """Locally typical sampling: tokens closest to the entropy, up to mass `typical_p`."""
    return _truncation(logits, config, typical_p=config.typical_p)


# ---- the min-new-tokens mask: state = tokens generated per row [B] int32 ---------------------
def _init_generated(prompt, prompt_lengths, vocab_size, config):
    return jnp.zeros(prompt.shape[:1], jnp.int32)


def _mask_early_eos(logits, config: SamplingConfig, generated):
    batch, vocab = logits.shape
    too_early = generated < per_row(config.min_new_tokens, batch)
    stops = jnp.where(too_early[:, None], config.stop_ids(batch), -1)  # [B, S], -1 masks nothing
    return mask_token_ids(logits, config, stops)


def _count_generated(generated, tokens, active, config):
    return generated + active.astype(jnp.int32)


mask_eos_before_min_new_tokens = LogitsProcessor(_init_generated, _mask_early_eos, _count_generated)
"""Masks `config.eos_token_id` and every `config.stop_token_ids` while fewer than
`config.min_new_tokens` tokens were generated (Hugging Face masks each EOS id)."""


# ---- penalties: state = [B, V] int32 counts of each token seen, prompt included --------------
def _init_counts(prompt, prompt_lengths, vocab_size, config):
    first_id = Vocab(config.vocab_axis).offset(vocab_size)
    return token_counts(prompt_ids(prompt, prompt_lengths), vocab_size, first_id)


def _add_tokens(counts, tokens, active, config):
    """counts[b, tokens[b]] += 1 for active rows: an elementwise one-hot add rather than a
    scatter, so a vocabulary-sharded `counts` is updated in place on every device."""
    token_ids = Vocab(config.vocab_axis).token_ids(counts.shape[-1])
    hit = (token_ids[None] == tokens[:, None]) & active[:, None]
    return counts + hit.astype(counts.dtype)


def _repetition_penalty(logits, config: SamplingConfig, counts):
    """HF rule on every token seen: negative logits times the penalty, positive ones divided.
    Inside `jit` a penalty <= 0 or NaN is off, an inf one clamps to the largest float32."""
    penalty = per_row(config.repetition_penalty, logits.shape[0], jnp.float32)[:, None]
    penalty = jnp.where(penalty > 0, jnp.minimum(penalty, jnp.finfo(jnp.float32).max), 1.0)
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(counts > 0, penalised, logits)


def _presence_frequency(logits, config: SamplingConfig, counts):
    """OpenAI rule: `logit - presence * [count > 0] - frequency * count`. Inside `jit` a NaN
    penalty is off and the result is clamped to finite floats (an inf penalty removes or
    favours the seen tokens to the float32 limit, never NaN)."""
    batch = logits.shape[0]
    presence = jnp.nan_to_num(per_row(config.presence_penalty, batch, jnp.float32), nan=0.0)[:, None]
    frequency = jnp.nan_to_num(per_row(config.frequency_penalty, batch, jnp.float32), nan=0.0)[:, None]
    seen = counts > 0
    penalty = jnp.where(seen, presence + frequency * counts.astype(jnp.float32), 0.0)
    limit = jnp.finfo(jnp.float32).max
    return jnp.where(seen & jnp.isfinite(logits), jnp.clip(logits - penalty, -limit, limit), logits)


def _counting(process) -> LogitsProcessor:
    return LogitsProcessor(_init_counts, process, _add_tokens)


apply_repetition_penalty = _counting(_repetition_penalty)
"""HF repetition penalty over the tokens seen (state: `[B, V]` counts)."""

apply_presence_frequency_penalties = _counting(_presence_frequency)
"""OpenAI presence/frequency penalties (state: `[B, V]` counts)."""


def _penalties(logits, config, counts):
    return _presence_frequency(_repetition_penalty(logits, config, counts), config, counts)


apply_penalties = _counting(_penalties)
"""Repetition, then presence/frequency penalties, from one `[B, V]` count state."""


# ---- n-gram bans over a window of recent tokens: state = [B, W] int32, newest last, -1 = none
def _init_recent(prompt, prompt_lengths, window: int):
    """The last `window` prompt tokens of each row, right-aligned, -1 before them."""
    batch, width = prompt.shape
    slot = jnp.arange(width)[None] + (window - prompt_lengths)[:, None]  # [B, P] target slots
    slot = jnp.where((slot >= 0) & (jnp.arange(width)[None] < prompt_lengths[:, None]), slot, window)
    recent = jnp.full((batch, window), -1, jnp.int32)
    return recent.at[jnp.arange(batch)[:, None], slot].set(prompt.astype(jnp.int32), mode="drop")


def _push_recent(recent, tokens, active):
    shifted = jnp.concatenate([recent[:, 1:], tokens[:, None].astype(jnp.int32)], axis=1)
    return jnp.where(active[:, None], shifted, recent)


@functools.cache
def no_repeat_ngram(ngram_size: int, window: int = 1024) -> LogitsProcessor:
    """Bans every token that would complete an n-gram already seen in the row (Hugging
    Face's `no_repeat_ngram_size`), looking at the last `window` tokens (prompt included;
    identical to Hugging Face while prompt + output fit the window). State: `[B, window]`."""
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"ngram_size must be a positive int, got {ngram_size!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < ngram_size:
        raise ValueError(f"window must be an int >= ngram_size ({ngram_size}), got {window!r}")
    n = ngram_size

    def init(prompt, prompt_lengths, vocab_size, config):
        return _init_recent(prompt, prompt_lengths, window)

    def process(logits, config, recent):
        # n-gram i spans recent[:, i : i + n]; it bans its last token when its first n - 1
        # tokens equal the row's last n - 1 (every n-gram, for n = 1).
        starts = window - n + 1
        matches = jnp.ones((recent.shape[0], starts), bool)
        for j in range(n - 1):
            prefix_token = recent[:, window - n + 1 + j][:, None]  # [B, 1]; -1: too few tokens yet
            matches &= (recent[:, j : j + starts] == prefix_token) & (prefix_token >= 0)
        completions = recent[:, n - 1 :]  # [B, starts]: the token after each prefix
        return mask_token_ids(logits, config, jnp.where(matches, completions, -1))

    def update(recent, tokens, active, config):
        return _push_recent(recent, tokens, active)

    return LogitsProcessor(init, process, update)


@functools.cache
def _bad_words(words: tuple[tuple[int, ...], ...]) -> LogitsProcessor:
    longest = max(len(w) for w in words)
    window = longest - 1
    # [N, L] right-aligned words, -1 on the left; a word's prefix must equal the row's last tokens.
    table = np.full((len(words), longest), -1, np.int32)
    for i, word in enumerate(words):
        table[i, longest - len(word) :] = word
    prefixes, last = table[:, :-1], table[:, -1]

    def init(prompt, prompt_lengths, vocab_size, config):
        return _init_recent(prompt, prompt_lengths, window)

    def process(logits, config, recent):
        # recent [B, L-1] lines up with prefixes [N, L-1]; padding (-1) in a prefix matches.
        matches = jnp.all((prefixes[None] == recent[:, None]) | (prefixes[None] < 0), axis=-1)  # [B, N]
        return mask_token_ids(logits, config, jnp.where(matches, last[None], -1))

    def update(recent, tokens, active, config):
        return _push_recent(recent, tokens, active)

    return LogitsProcessor(init, process, update)


def bad_words(words: Sequence[Sequence[int]]) -> LogitsProcessor:
    """Hugging Face's `bad_words_ids`: a one-token word is always banned; a longer word's
    last token is banned right after the row's tokens ended with the rest of the word
    (prompt included). State: `[B, longest word - 1]` recent tokens."""
    try:
        words = tuple(tuple(int(t) for t in word) for word in words)
    except (TypeError, ValueError):
        raise TypeError(f"bad_words must be a list of token-id lists, got {words!r}") from None
    if not words or any(len(w) == 0 or min(w) < 0 for w in words):
        raise ValueError(f"bad_words must be non-empty lists of token ids >= 0, got {words!r}")
    return _bad_words(words)


# ---- the config-driven n-gram bans in the default chain --------------------------------------
def _config_ngram_bans(config: SamplingConfig) -> LogitsProcessor:
    members = []
    if config.no_repeat_ngram_size:
        members.append(no_repeat_ngram(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        members.append(bad_words(config.bad_words_ids))
    return chain(*members)


def _init_config_ngram_bans(prompt, prompt_lengths, vocab_size, config):
    return _config_ngram_bans(config).init(prompt, prompt_lengths, vocab_size, config)


def _apply_config_ngram_bans(logits, config, state):
    return _config_ngram_bans(config).process(logits, config, state)


def _update_config_ngram_bans(state, tokens, active, config):
    return _config_ngram_bans(config).update(state, tokens, active, config)


ban_config_ngrams = LogitsProcessor(
    _init_config_ngram_bans, _apply_config_ngram_bans, _update_config_ngram_bans
)
"""`config.no_repeat_ngram_size` and `config.bad_words_ids` (static config fields; off by
default, when the state is empty and nothing runs)."""


DEFAULT_PROCESSORS: LogitsProcessor = chain(
    apply_logit_bias,
    mask_banned_tokens,
    mask_eos_before_min_new_tokens,
    apply_penalties,
    ban_config_ngrams,
    apply_temperature,
    apply_truncation,
)
