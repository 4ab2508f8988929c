"""An independent NumPy float64 reference for the sampling chain (sort-based, no rtdlm code).

Semantics are those of Hugging Face transformers' PyTorch processors and warpers, in their
order: logit bias, banned tokens, the min-new-tokens EOS mask, repetition penalty (over the
set of tokens in the history), OpenAI presence/frequency penalties (over counts),
temperature, top-k, top-p, min-p, typical-p; greedy rows keep only the first argmax.

Every truncation rule keeps ties with its threshold value: top-k keeps every token equal to
the k-th largest value, top-p every token equal to the crossing token, typical-p every token
as close to the entropy as the crossing token.

Besides the processed logits, the reference reports a per-row *margin*: how far each
decision was from flipping (mass distance of the top-p / typical-p target from the
cumulative masses around the crossing, logit distance of the nearest token from a min-p or
top-k boundary). A float32 implementation may legitimately disagree with float64 only when
the margin is within rounding, so exact kept-set comparisons skip rows with a tiny margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_HISTORY_FREE = np.zeros(0, np.int64)


@dataclass
class Reference:
    """Result of `reference_process`: everything for `[B, V]`, or for `[V]` input unbatched."""

    logits: np.ndarray  # [B, V] float64, removed tokens -inf
    probabilities: np.ndarray  # [B, V] float64, softmax of `logits`
    greedy: np.ndarray  # [B] bool
    margin: np.ndarray  # [B] float64: smallest distance of any decision from its boundary

    def kept(self) -> np.ndarray:
        return np.isfinite(self.logits)


def softmax(z: np.ndarray) -> np.ndarray:
    """float64 softmax of the last axis; -inf entries get probability 0."""
    z = np.asarray(z, np.float64)
    top = np.max(z, axis=-1, keepdims=True)
    weights = np.exp(z - top)
    return weights / np.sum(weights, axis=-1, keepdims=True)


def _row_value(value: Any, b: int, batch: int, default: Any) -> Any:
    """A parameter given as a scalar or one value per row -> the value for row b."""
    if value is None:
        return default
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    if arr.shape[0] != batch:
        raise ValueError(f"per-row parameter has {arr.shape[0]} rows, logits {batch}")
    return arr[b].item()


def _row_bias(logit_bias: Any, b: int) -> Mapping[int, float]:
    if logit_bias is None:
        return {}
    if isinstance(logit_bias, Mapping):
        return logit_bias
    return logit_bias[b]


def _row_banned(banned: Any, b: int) -> list[int]:
    if banned is None:
        return []
    if len(banned) and isinstance(banned[0], (list, tuple, np.ndarray)):
        return [int(t) for t in banned[b] if t >= 0]
    return [int(t) for t in banned if t >= 0]


def _crossing(sorted_mass: np.ndarray, target: float) -> tuple[int, float]:
    """Index of the first prefix whose cumulative mass reaches `target`, and the margin.

    The margin is the distance of `target` from the cumulative masses just before and at the
    crossing (the numbers a float32 implementation compares against the target).
    """
    cumulative = np.cumsum(sorted_mass)
    reached = np.nonzero(cumulative >= target)[0]
    # float64 rounding can leave the total a hair under a target of ~1: keep everything then
    index = int(reached[0]) if reached.size else int(np.count_nonzero(sorted_mass > 0) - 1)
    before = cumulative[index - 1] if index > 0 else 0.0
    return index, float(min(abs(target - before), abs(cumulative[index] - target)))


def _top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    descending = np.sort(z)[::-1]
    kth = descending[k - 1]
    lower = descending[descending < kth]
    gap = np.inf
    if np.isfinite(kth) and lower.size and np.isfinite(lower[0]):
        gap = (kth - lower[0]) / max(1.0, abs(kth))
    return np.where(z >= kth, z, -np.inf), gap


def _top_p(z: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    probs = softmax(z)
    order = np.argsort(-probs, kind="stable")
    index, margin = _crossing(probs[order], p)
    crossing_value = z[order[index]]
    # the mass of the tie group around the crossing value decides it, not a single token
    above = probs[z > crossing_value].sum()
    through = probs[z >= crossing_value].sum()
    margin = min(margin, abs(p - above), abs(through - p))
    return np.where(z >= crossing_value, z, -np.inf), margin


def _min_p(z: np.ndarray, min_p: float) -> tuple[np.ndarray, float]:
    # p_i >= min_p * p_max  <=>  z_i - z_max >= log(min_p)
    top = np.max(z)
    relative = z - top
    boundary = np.log(min_p)
    finite = np.isfinite(relative)
    margin = np.min(np.abs(relative[finite] - boundary)) / max(1.0, abs(top)) if finite.any() else np.inf
    return np.where(relative >= boundary, z, -np.inf), float(margin)


def _typical_p(z: np.ndarray, mass: float) -> tuple[np.ndarray, float]:
    """HF's TypicalLogitsWarper on one row (current distribution, crossing included)."""
    probs = softmax(z)
    finite = np.isfinite(z)
    log_probs = np.where(finite, z - np.max(z) - np.log(np.sum(np.exp(z[finite] - np.max(z)))), -np.inf)
    entropy = -np.sum(probs[finite] * log_probs[finite])
    distance = np.where(finite, np.abs(-log_probs - entropy), np.inf)
    order = np.argsort(distance, kind="stable")
    index, margin = _crossing(probs[order], mass)
    crossing_distance = distance[order[index]]
    scale = max(1.0, abs(entropy))
    others = distance[finite & (distance != crossing_distance)]
    if others.size:
        margin = min(margin, np.min(np.abs(others - crossing_distance)) / scale)
    return np.where(finite & (distance <= crossing_distance), z, -np.inf), float(margin)


def reference_process(
    logits: np.ndarray,
    *,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    min_p: Any = 0.0,
    typical_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
    presence_penalty: Any = 0.0,
    frequency_penalty: Any = 0.0,
    do_sample: Any = True,
    logit_bias: Mapping[int, float] | Sequence[Mapping[int, float]] | None = None,
    banned_token_ids: Any = None,
    min_new_tokens: Any = 0,
    eos_token_id: Any = -1,
    seed: Any = None,  # accepted (and ignored) so one dict of parameters can build both sides
    token_history: Any = None,
    num_generated: Any = 0,
) -> Reference:
    """The whole chain in float64, row by row. Parameters: scalars or one value per row.

    Args:
      logits: [V] or [B, V] (any float dtype; NaN counts as removed, a row with nothing finite
        is uniform; +inf is not modelled here - the tests check it directly).
      token_history: [H] or [B, H] ints, -1 = padding (never penalises anything): the
        context seen so far (penalties).
      num_generated: scalar or [B], tokens generated so far (min_new_tokens).
    """
    del seed
    logits = np.asarray(logits, np.float64)
    squeeze = logits.ndim == 1
    logits = np.atleast_2d(logits)
    batch, vocab = logits.shape
    if token_history is None:
        history = np.full((batch, 0), -1, np.int64)
    else:
        history = np.atleast_2d(np.asarray(token_history, np.int64))
    out = np.empty_like(logits)
    greedy = np.zeros(batch, bool)
    margins = np.full(batch, np.inf)
    for b in range(batch):
        z = logits[b].copy()
        # 1. logit bias, banned tokens, the min-new-tokens EOS mask
        for token, bias in _row_bias(logit_bias, b).items():
            z[int(token)] += float(bias)
        z[_row_banned(banned_token_ids, b)] = -np.inf
        past = history[b][history[b] >= 0] if history.shape[1] else _HISTORY_FREE
        eos = int(_row_value(eos_token_id, b, batch, -1))
        if eos >= 0 and int(_row_value(num_generated, b, batch, 0)) < int(
            _row_value(min_new_tokens, b, batch, 0)
        ):
            z[eos] = -np.inf
        # 2. penalties: HF repetition penalty on the set seen, OpenAI rule on the counts
        counts = np.bincount(past[past < vocab], minlength=vocab)
        seen = counts > 0
        penalty = float(_row_value(repetition_penalty, b, batch, 1.0))
        z = np.where(seen, np.where(z < 0, z * penalty, z / penalty), z)
        presence = float(_row_value(presence_penalty, b, batch, 0.0))
        frequency = float(_row_value(frequency_penalty, b, batch, 0.0))
        z = z - presence * seen - frequency * counts
        # 3. NaN counts as removed; a row with nothing finite is uniform
        z = np.where(np.isnan(z), -np.inf, z)
        if not np.isfinite(z).any() and not (z == np.inf).any():
            z = np.zeros(vocab)
        t = float(_row_value(temperature, b, batch, 1.0))
        greedy[b] = not t > 0 or not bool(_row_value(do_sample, b, batch, True))
        if greedy[b]:
            first = int(np.argmax(z))
            descending = np.sort(z)[::-1]
            if vocab > 1 and np.isfinite(descending[1]):
                margins[b] = (descending[0] - descending[1]) / max(1.0, abs(descending[0]))
            out[b] = np.full(vocab, -np.inf)
            out[b, first] = z[first]
            continue
        z = z / t
        # 4. truncation, in HF's order, each on the distribution left by the previous one
        margin = np.inf
        k = int(_row_value(top_k, b, batch, 0))
        if 0 < k < vocab:
            z, m = _top_k(z, k)
            margin = min(margin, m)
        p = float(_row_value(top_p, b, batch, 1.0))
        if p < 1.0:
            z, m = _top_p(z, p)
            margin = min(margin, m)
        mp = float(_row_value(min_p, b, batch, 0.0))
        if mp > 0.0:
            z, m = _min_p(z, mp)
            margin = min(margin, m)
        tp = float(_row_value(typical_p, b, batch, 1.0))
        if tp < 1.0:
            z, m = _typical_p(z, tp)
            margin = min(margin, m)
        out[b] = z
        margins[b] = margin
    probabilities = softmax(out)
    if squeeze:
        return Reference(out[0], probabilities[0], greedy[0], margins[0])
    return Reference(out, probabilities, greedy, margins)


def state_after_generating(processors, generated, vocab_size, config):
    """The processors' state after an empty prompt and then `generated` [B, H] tokens
    (-1 = padding, skipped), fed through `update` one column at a time: the state a decode
    loop has after emitting them (unlike `init_from_history`, which reads them as context)."""
    import jax.numpy as jnp

    from rtdlm.sampling import as_processor

    processors = as_processor(processors)
    generated = jnp.asarray(generated, jnp.int32)
    batch = generated.shape[0]
    state = processors.init(jnp.zeros((batch, 0), jnp.int32), jnp.zeros(batch, jnp.int32), vocab_size, config)
    for column in generated.T:
        state = processors.update(state, column, column >= 0, config)
    return state
