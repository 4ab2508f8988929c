"""Constraints as stateful logits processors: the automaton runs on the device.

The state is each row's automaton state, `[B]` int32. `process` gathers the row's
allowed-token bitmask (`[B, ceil(V/32)]` uint32) and sets every other token to -inf;
`update` follows the chosen token: a gather in a dense `[S, V]` next-state table where that
fits (`DENSE_LIMIT_BYTES`), otherwise a binary search in the state's sorted (token, next)
list. Both are O(B * V) elementwise work or less per step, with no host round trip.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.constraints import automaton as _automaton
from rtdlm.sampling.processors import LogitsProcessor
from rtdlm.sampling.vocab import Vocab

DENSE_LIMIT_BYTES = 4 << 20  # a dense [S, V] int32 next-state table up to 4 MB


@dataclasses.dataclass(frozen=True, eq=False)
class _Tables:
    """The device arrays of one automaton (or a stack of them); hashed by identity, so a
    processor built once is one static argument and compiles once."""

    allowed: jax.Array  # [S, W] uint32
    next_dense: jax.Array | None  # [S, V] int32, or None: use the sorted lists
    offsets: jax.Array  # [S + 1] int32
    tokens: jax.Array  # [E] int32
    targets: jax.Array  # [E] int32
    initial: np.ndarray  # [] or [R] int32: the start state (of each row)
    eos: tuple[int, ...]
    vocab_size: int
    search_steps: int  # binary-search iterations: ceil(log2(longest list + 1))
    automaton: _automaton.Automaton  # the host copy (for stack and for measuring)
    parts: tuple  # (automata, rows) this was stacked from; () for one automaton

    @classmethod
    def build(cls, auto: _automaton.Automaton, eos, initial, parts=()):
        longest = int(np.max(np.diff(auto.offsets))) if auto.num_states else 0
        dense = None
        if auto.num_states * auto.vocab_size * 4 <= DENSE_LIMIT_BYTES:
            dense = np.full((auto.num_states, auto.vocab_size), _automaton.END_STATE, np.int32)
            states = np.repeat(np.arange(auto.num_states), np.diff(auto.offsets))
            dense[states, auto.tokens] = auto.targets
            dense = jnp.asarray(dense)
        return cls(
            allowed=jnp.asarray(auto.allowed),
            next_dense=dense,
            offsets=jnp.asarray(auto.offsets),
            tokens=jnp.asarray(auto.tokens),
            targets=jnp.asarray(auto.targets),
            initial=np.asarray(initial, np.int32),
            eos=eos,
            vocab_size=auto.vocab_size,
            search_steps=max(1, math.ceil(math.log2(longest + 1))),
            automaton=auto,
            parts=parts,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the device tables."""
        arrays = (self.allowed, self.next_dense, self.offsets, self.tokens, self.targets)
        return sum(a.nbytes for a in arrays if a is not None)

    # ---- LogitsProcessor functions ---------------------------------------------------------
    def init(self, prompt, prompt_lengths, vocab_size, config):
        """Every row starts in its start state; the prompt is not matched, only the output."""
        batch = prompt.shape[0]
        if config.vocab_axis is None and self.vocab_size > vocab_size:
            raise ValueError(
                f"the constraint's vocabulary ({self.vocab_size} tokens) is larger than "
                f"the model's ({vocab_size})"
            )
        if self.initial.ndim and self.initial.shape[0] != batch:
            raise ValueError(f"this constraint stack has {self.initial.shape[0]} rows, the batch has {batch}")
        return jnp.broadcast_to(jnp.asarray(self.initial), (batch,)).astype(jnp.int32)

    def process(self, logits, config, state):
        """[B, V] logits with the tokens the row's state does not allow set to -inf. A row
        left with no finite logit (a dead end, or the model gives every allowed token -inf)
        gets logit 0 on its EOS id(s): the row ends."""
        batch, vocab = logits.shape
        vocab_of = Vocab(config.vocab_axis)
        words = self.allowed[state]  # [B, W]
        if vocab_of.sharded:
            ids = vocab_of.token_ids(vocab)  # [V_local] global ids
            word = jnp.take(words, jnp.minimum(ids >> 5, words.shape[1] - 1), axis=1)  # [B, V_local]
            bits = ((word >> (ids & 31).astype(jnp.uint32)) & 1).astype(bool) & (ids < self.vocab_size)[None]
        else:
            ids = jnp.arange(vocab)
            shifts = jnp.arange(32, dtype=jnp.uint32)
            bits = (
                ((words[:, :, None] >> shifts[None, None]) & 1).astype(bool).reshape(batch, -1)
            )  # [B, 32 W]
            width = bits.shape[1]
            bits = bits[:, :vocab] if width >= vocab else jnp.pad(bits, ((0, 0), (0, vocab - width)))
        masked = jnp.where(bits, logits, -jnp.inf)
        dead = vocab_of.sum(jnp.isfinite(masked).astype(jnp.float32)) == 0  # [B]
        is_eos = functools.reduce(jnp.logical_or, [ids == e for e in self.eos])  # [V]
        return jnp.where(dead[:, None] & is_eos[None], 0.0, masked).astype(logits.dtype)

    def update(self, state, tokens, active, config):
        """The state after `tokens` [B] (active rows); a token the state does not allow
        (EOS included) leads to the end state."""
        tokens = tokens.astype(jnp.int32)
        if self.next_dense is not None:
            in_range = (tokens >= 0) & (tokens < self.vocab_size)
            following = jnp.where(
                in_range,
                self.next_dense[state, jnp.clip(tokens, 0, self.vocab_size - 1)],
                _automaton.END_STATE,
            )
        else:
            following = self._search(state, tokens)
        return jnp.where(active, following, state).astype(jnp.int32)

    def _search(self, state, tokens):
        """Lower-bound binary search for `tokens` in each row's sorted transition list."""
        lo, end = self.offsets[state], self.offsets[state + 1]  # [B]
        hi = end
        last = max(self.tokens.shape[0] - 1, 0)
        for _ in range(self.search_steps):
            mid = (lo + hi) // 2
            below = self.tokens[jnp.minimum(mid, last)] < tokens
            open_ = lo < hi
            lo = jnp.where(open_ & below, mid + 1, lo)
            hi = jnp.where(open_ & ~below, mid, hi)
        at = jnp.minimum(lo, last)
        found = (lo < end) & (self.tokens[at] == tokens)
        return jnp.where(found, self.targets[at], _automaton.END_STATE)


@dataclasses.dataclass(frozen=True, eq=False)
class _Init:
    tables: _Tables

    def __call__(self, prompt, prompt_lengths, vocab_size, config):
        return self.tables.init(prompt, prompt_lengths, vocab_size, config)


@dataclasses.dataclass(frozen=True, eq=False)
class _Process:
    tables: _Tables

    def __call__(self, logits, config, state):
        return self.tables.process(logits, config, state)


@dataclasses.dataclass(frozen=True, eq=False)
class _Update:
    tables: _Tables

    def __call__(self, state, tokens, active, config):
        return self.tables.update(state, tokens, active, config)


def _processor(tables: _Tables) -> LogitsProcessor:
    return LogitsProcessor(_Init(tables), _Process(tables), _Update(tables))


def tables_of(processor: LogitsProcessor) -> _Tables:
    """The device tables behind a constraint processor (a ValueError for other processors)."""
    tables = getattr(processor.process, "tables", None) if isinstance(processor, LogitsProcessor) else None
    if not isinstance(tables, _Tables):
        raise ValueError(f"not a constraint from rtdlm.constraints: {processor!r}")
    return tables


@functools.lru_cache(maxsize=32)
def _regex_cached(pattern, vocabulary, eos) -> LogitsProcessor:
    auto = _automaton.from_regex(pattern, vocabulary, eos)
    return _processor(_Tables.build(auto, eos, auto.initial))


def regex(
    pattern: str, vocabulary: Sequence[bytes], eos_token_id: int | Sequence[int] = 0
) -> LogitsProcessor:
    """A processor that keeps each row's output a prefix of a full match of `pattern`, and
    allows EOS only once the output matches.

    Args:
      pattern: a regex (outlines-core / Rust `regex` syntax, matched against the whole
        output as bytes; `.` and classes match UTF-8 characters).
      vocabulary: `vocabulary[i]` is token i's bytes (partial UTF-8 allowed); empty tokens
        are never allowed.
      eos_token_id: the EOS id or ids (allowed only in accepting states).

    Returns:
      A `LogitsProcessor` with state `[B]` int32 (automaton states). Put it first in the
      chain, `chain(constraint, DEFAULT_PROCESSORS)`, so top-k/top-p and greedy choose among
      allowed tokens. A row with no allowed finite logit gets only EOS (it ends); once
      finished (EOS, or a token the constraint forbids) a row's state allows only EOS.
      Equal arguments return the same processor (one compiled program).

    Raises:
      ValueError: an invalid pattern, vocabulary or EOS id, or a pattern the vocabulary
        cannot spell.

    >>> from rtdlm.models import byte_vocabulary, EOS_ID
    >>> digits = regex(r"[0-9]{3}", byte_vocabulary(), eos_token_id=EOS_ID)
    >>> from rtdlm.sampling import SamplingConfig
    >>> digits.init(jnp.zeros((2, 1), jnp.int32), jnp.ones(2, jnp.int32), 256, SamplingConfig()).shape
    (2,)
    """
    vocabulary = _automaton.check_vocabulary(vocabulary)
    eos = _automaton.eos_ids(eos_token_id, len(vocabulary))
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a str, got {type(pattern).__name__}")
    return _regex_cached(pattern, vocabulary, eos)


def json_schema(
    schema, vocabulary: Sequence[bytes], eos_token_id: int | Sequence[int] = 0, *, whitespace_pattern=None
) -> LogitsProcessor:
    """`regex` of the JSON schema's regex (outlines-core's `build_regex_from_schema`):
    every finished row is a JSON document valid under `schema` (a dict or a JSON string).

    `whitespace_pattern` is the regex allowed between JSON tokens (default `[ ]?`).
    Raises ValueError for invalid JSON or a schema outlines-core cannot express.
    """
    return regex(_automaton.regex_from_schema(schema, whitespace_pattern), vocabulary, eos_token_id)


@functools.lru_cache(maxsize=32)
def _stack_cached(rows: tuple) -> LogitsProcessor:
    constraints = list(dict.fromkeys(r for r in rows if r is not None))
    tables = [tables_of(c) for c in constraints]
    if len({t.eos for t in tables}) > 1 or len({t.vocab_size for t in tables}) > 1:
        raise ValueError("stacked constraints must share the vocabulary size and EOS ids")
    if not tables:
        raise ValueError("stack needs at least one constraint (all rows are None)")
    automata = [t.automaton for t in tables]
    if None in rows:
        automata.append(_automaton.free(tables[0].vocab_size))
    joined, starts = _automaton.concatenate(automata)
    index = {c: i for i, c in enumerate(constraints)}
    initial = [starts[index[r]] + automata[index[r]].initial if r is not None else starts[-1] for r in rows]
    return _processor(_Tables.build(joined, tables[0].eos, initial, parts=(tuple(automata), rows)))


def stack(rows: Sequence[LogitsProcessor | None]) -> LogitsProcessor:
    """One processor for a batch whose rows follow different constraints: `rows[b]` is row
    b's constraint (from `regex`/`json_schema`, sharing one vocabulary and EOS) or None for
    a free row. The tables are concatenated and each row starts at its own constraint's
    start state; `len(rows)` must equal the batch size the decoder runs (after `num_samples`).
    """
    rows = tuple(rows)
    if not rows:
        raise ValueError("stack needs one entry per batch row")
    for r in rows:
        if r is not None:
            tables_of(r)
    return _stack_cached(rows)


def table_bytes(processor: LogitsProcessor) -> int:
    """Device memory of a constraint's tables, in bytes."""
    return tables_of(processor).nbytes
