"""Token-level automata, built on the host with outlines-core and laid out for the device.

outlines-core compiles a regex (or the regex of a JSON schema) to a byte-level DFA and walks
every token's bytes through it, giving per DFA state the tokens that keep a match possible
and the state each one leads to. `Automaton` holds that index as numpy arrays:

    allowed  [S, ceil(V/32)] uint32   bit t of row s: token t may follow state s (EOS bits
                                      set in accepting states, in the end state and in states
                                      with no live continuation)
    offsets  [S + 1] int32            state s's transitions are entries offsets[s]:offsets[s+1]
    tokens   [E] int32                of `tokens` (ascending within a state) ...
    targets  [E] int32                ... and `targets` (the next state)

State 0 is the end state (after EOS or a token the automaton does not allow): only EOS is
allowed there and nothing leaves it. States from which no accepting state can be reached
are pruned, so every transition keeps a full match possible.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

END_STATE = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Automaton:
    """A token-level automaton as flat arrays (see the module docstring for the shapes)."""

    allowed: np.ndarray  # [S, W] uint32
    offsets: np.ndarray  # [S + 1] int32
    tokens: np.ndarray  # [E] int32
    targets: np.ndarray  # [E] int32
    initial: int
    vocab_size: int

    @property
    def num_states(self) -> int:
        return self.allowed.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.allowed, self.offsets, self.tokens, self.targets))


def _words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def _set_bits(allowed_row: np.ndarray, token_ids) -> None:
    ids = np.asarray(token_ids, np.int64)
    np.bitwise_or.at(allowed_row, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))


def eos_ids(eos_token_id, vocab_size: int) -> tuple[int, ...]:
    """EOS id(s) as a non-empty tuple of ints in [0, V); a ValueError otherwise."""
    ids = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else tuple(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
    if any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_token_id {eos_token_id!r} is outside the vocabulary (size {vocab_size})")
    return tuple(int(i) for i in ids)


def check_vocabulary(vocabulary) -> tuple[bytes, ...]:
    """`vocabulary` as a tuple of bytes (str entries are UTF-8 encoded); a ValueError otherwise."""
    if isinstance(vocabulary, (str, bytes)) or not isinstance(vocabulary, Sequence) or not vocabulary:
        raise ValueError("vocabulary must be a non-empty sequence of bytes, one entry per token id")
    out = []
    for i, token in enumerate(vocabulary):
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes):
            raise ValueError(f"vocabulary[{i}] must be bytes, got {type(token).__name__}")
        out.append(token)
    return tuple(out)


def from_regex(pattern: str, vocabulary: tuple[bytes, ...], eos: tuple[int, ...]) -> Automaton:
    """The token-level automaton of full matches of `pattern` (outlines-core's regex
    syntax) over `vocabulary`; EOS ids and empty tokens are never part of a match."""
    import outlines_core

    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a str, got {type(pattern).__name__}")
    token_map: dict[bytes, list[int]] = {}
    for i, token in enumerate(vocabulary):
        if token and i not in eos:
            token_map.setdefault(token, []).append(i)
    try:
        index = outlines_core.Index(pattern, outlines_core.Vocabulary(eos[0], token_map))
    except Exception as error:  # outlines-core raises ValueError (or a Rust panic) with its reason
        raise ValueError(f"cannot build an automaton for regex {pattern!r}: {error}") from None
    transitions = index.get_transitions()  # {state: {token: next state}}, EOS included
    finals = set(index.get_final_states())
    eos_set = set(eos) | {eos[0]}

    # Live states: accepting, or with a transition to a live state (fixed point).
    live = set(finals)
    changed = True
    while changed:
        changed = False
        for state, edges in transitions.items():
            if state not in live and any(t in live for tok, t in edges.items() if tok not in eos_set):
                live.add(state)
                changed = True
    initial = index.get_initial_state()
    if initial not in live:
        raise ValueError(f"regex {pattern!r} has no match made of this vocabulary's tokens")
    order = sorted(live, key=lambda s: (s != initial, s))
    number = {state: i + 1 for i, state in enumerate(order)}  # 0 is the end state

    vocab_size = len(vocabulary)
    num_states = len(order) + 1
    allowed = np.zeros((num_states, _words(vocab_size)), np.uint32)
    _set_bits(allowed[END_STATE], eos)
    offsets = np.zeros(num_states + 1, np.int64)
    token_lists, target_lists = [], []
    for state in order:
        s = number[state]
        edges = sorted(
            (tok, number[t])
            for tok, t in transitions.get(state, {}).items()
            if tok not in eos_set and t in number
        )
        ids = np.array([tok for tok, _ in edges], np.int64)
        token_lists.append(ids)
        target_lists.append(np.array([t for _, t in edges], np.int64))
        offsets[s + 1] = len(edges)
        _set_bits(allowed[s], ids)
        if state in finals or not edges:  # accepting, or a dead end: EOS ends the row
            _set_bits(allowed[s], eos)
    return Automaton(
        allowed=allowed,
        offsets=np.cumsum(offsets).astype(np.int32),
        tokens=np.concatenate(token_lists).astype(np.int32),
        targets=np.concatenate(target_lists).astype(np.int32),
        initial=number[initial],
        vocab_size=vocab_size,
    )


def regex_from_schema(schema, whitespace_pattern: str | None = None) -> str:
    """outlines-core's regex for a JSON schema (a dict or a JSON string); a ValueError for a
    schema it cannot express."""
    import outlines_core

    if isinstance(schema, dict):
        schema = json.dumps(schema)
    if not isinstance(schema, str):
        raise ValueError(f"schema must be a dict or a JSON string, got {type(schema).__name__}")
    try:
        json.loads(schema)
    except json.JSONDecodeError as error:
        raise ValueError(f"schema is not valid JSON: {error}") from None
    try:
        return outlines_core.json_schema.build_regex_from_schema(schema, whitespace_pattern)
    except Exception as error:
        raise ValueError(f"unsupported JSON schema: {error}") from None


def free(vocab_size: int) -> Automaton:
    """One state that allows every token and loops on it: an unconstrained row."""
    allowed = np.full((1, _words(vocab_size)), 0xFFFFFFFF, np.uint32)
    return Automaton(
        allowed=allowed,
        offsets=np.array([0, vocab_size], np.int32),
        tokens=np.arange(vocab_size, dtype=np.int32),
        targets=np.zeros(vocab_size, np.int32),
        initial=0,
        vocab_size=vocab_size,
    )


def concatenate(automata: Sequence[Automaton]) -> tuple[Automaton, list[int]]:
    """One automaton holding all of `automata` side by side (states renumbered), and the
    state offset of each; the end state is the first one's (state 0)."""
    starts = np.cumsum([0] + [a.num_states for a in automata])
    edge_starts = np.cumsum([0] + [len(a.tokens) for a in automata])
    width = max(a.allowed.shape[1] for a in automata)
    allowed = np.zeros((int(starts[-1]), width), np.uint32)
    for a, s in zip(automata, starts, strict=False):
        allowed[s : s + a.num_states, : a.allowed.shape[1]] = a.allowed
    offsets = np.concatenate(
        [a.offsets[:-1] + e for a, e in zip(automata, edge_starts, strict=False)] + [edge_starts[-1:]]
    )
    joined = Automaton(
        allowed=allowed,
        offsets=offsets.astype(np.int32),
        tokens=np.concatenate([a.tokens for a in automata]),
        targets=np.concatenate([a.targets + s for a, s in zip(automata, starts, strict=False)]).astype(
            np.int32
        ),
        initial=automata[0].initial,
        vocab_size=max(a.vocab_size for a in automata),
    )
    return joined, [int(s) for s in starts[:-1]]
