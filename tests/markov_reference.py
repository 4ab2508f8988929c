"""Exact float64 NumPy reference for generations of a first-order Markov model.

For `rtdlm.decoding.testing.MarkovModel` (next-token logits = `table[current token]`), the
joint distribution of the first n new tokens under a sampling configuration is computed
exactly, by enumerating every sequence of n tokens (V**n cells, so keep V small) and
applying an independent float64 implementation of the processing chain:

  min-new-tokens EOS mask -> repetition penalty (HF rule, over the *set* of tokens in
  prompt + generated history) -> temperature -> top-k (ties with the k-th value kept) ->
  top-p (on the top-k renormalised distribution, the crossing token and its ties kept)
  -> min-p (relative to the most probable token) ; greedy rows take the first argmax.

After a row emits EOS the rest of the row is `pad_token_id` with probability one.
`chisquare_pvalue` compares sampled rows against such a joint distribution.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

# SamplingConfig fields the reference implements, with their "off" values.
PARAMS = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "do_sample": True,
    "min_new_tokens": 0,
    "eos_token_id": -1,
}


def params_from_config(config) -> dict:
    """The scalar settings of a `SamplingConfig` (every implemented field must be a scalar)."""
    out = {}
    for name, default in PARAMS.items():
        value = np.asarray(getattr(config, name))
        if value.ndim != 0:
            raise ValueError(f"the reference takes scalar settings, {name} has shape {value.shape}")
        out[name] = type(default)(value.item())
    return out


def process_distribution(
    logits,
    seen=None,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    repetition_penalty=1.0,
    do_sample=True,
):
    """[N, V] logits -> [N, V] float64 probabilities after the whole processing chain.

    `seen` [N, V] bool marks the tokens in each row's history (repetition penalty).
    """
    z = np.array(logits, dtype=np.float64, ndmin=2)
    rows, vocab = z.shape
    if seen is not None and repetition_penalty != 1.0:
        penalised = np.where(z < 0, z * repetition_penalty, z / repetition_penalty)
        z = np.where(seen, penalised, z)
    if temperature <= 0 or not do_sample:
        out = np.zeros_like(z)
        out[np.arange(rows), np.argmax(z, axis=-1)] = 1.0  # np.argmax: the first maximum
        return out
    z = z / temperature
    keep = np.isfinite(z)
    descending = -np.sort(-z, axis=-1)  # [N, V], -inf last
    if 0 < top_k < vocab:
        keep &= z >= descending[:, top_k - 1 : top_k]
    if top_p < 1.0:
        with np.errstate(invalid="ignore"):
            weights = np.where(keep, np.exp(z - descending[:, :1]), 0.0)
        sorted_weights = -np.sort(-weights, axis=-1)
        cumulative = np.cumsum(sorted_weights, axis=-1) / np.sum(weights, axis=-1, keepdims=True)
        crossing = np.argmax(cumulative >= top_p, axis=-1)  # first index reaching the mass
        threshold = sorted_weights[np.arange(rows), crossing][:, None]
        keep &= weights >= threshold
    if min_p > 0.0:
        keep &= z >= descending[:, :1] + np.log(min_p)
    weights = np.where(keep, np.exp(np.where(keep, z, 0.0) - descending[:, :1]), 0.0)
    return weights / np.sum(weights, axis=-1, keepdims=True)


def markov_joint(table, prompt, num_tokens: int, config=None, *, pad_token_id: int = 0, **params):
    """Exact joint distribution of the first `num_tokens` new tokens, shape [V] * num_tokens.

    Args:
      table: [V, V] Markov logits (row = current token).
      prompt: 1-D token ids (the row's real prompt, no padding).
      config: a `SamplingConfig` with scalar fields, or None; keyword `params` override it.
    """
    table = np.asarray(table, np.float64)
    vocab = table.shape[-1]
    settings = dict(PARAMS)
    if config is not None:
        settings.update(params_from_config(config))
    settings.update(params)
    eos, min_new_tokens = settings.pop("eos_token_id"), settings.pop("min_new_tokens")
    prompt = np.asarray(prompt, np.int64).reshape(-1)
    prompt_seen = np.zeros(vocab, bool)
    prompt_seen[prompt] = True

    prefixes = np.zeros((1, 0), np.int64)  # [M, t]: every sequence of t tokens, lexicographic
    probs = np.ones(1)  # [M]
    for t in range(num_tokens):
        count = prefixes.shape[0]
        last = np.full(count, prompt[-1]) if t == 0 else prefixes[:, -1]
        done = np.any(prefixes == eos, axis=1) if eos >= 0 else np.zeros(count, bool)
        seen = np.repeat(prompt_seen[None], count, axis=0)
        for j in range(t):
            seen[np.arange(count), prefixes[:, j]] = True
        logits = table[last]
        if eos >= 0 and t < min_new_tokens:
            logits = logits.copy()
            logits[:, eos] = -np.inf
        step = process_distribution(logits, seen, **settings)
        step[done] = np.eye(vocab)[pad_token_id]
        probs = (probs[:, None] * step).reshape(-1)
        prefixes = np.concatenate(
            [np.repeat(prefixes, vocab, axis=0), np.tile(np.arange(vocab), count)[:, None]], axis=1
        )
    return probs.reshape((vocab,) * num_tokens)


def greedy_chain(table, prompt, num_tokens: int, repetition_penalty: float = 1.0):
    """The argmax chain, token by token, with the repetition penalty over the seen set."""
    table = np.asarray(table, np.float64)
    history = [int(x) for x in np.asarray(prompt).reshape(-1)]
    out = []
    for _ in range(num_tokens):
        logits = table[history[-1]].copy()
        seen = sorted(set(history))
        logits[seen] = np.where(
            logits[seen] < 0, logits[seen] * repetition_penalty, logits[seen] / repetition_penalty
        )
        token = int(np.argmax(logits))
        out.append(token)
        history.append(token)
    return np.array(out)


def chisquare_pvalue(samples, joint, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of sampled rows [N, n] against a joint distribution [V]*n.

    Cells with expected count >= `min_expected` are tested one by one; the rest are pooled
    into one cell when their pooled expectation reaches `min_expected`, else left out (and
    the expectation rescaled to the tested rows). Any sample in a probability-zero cell
    fails at once: the support must be exact, not just statistically close.
    """
    joint = np.asarray(joint, np.float64)
    samples = np.asarray(samples).reshape(len(samples), -1)
    assert samples.shape[1] == joint.ndim, (samples.shape, joint.shape)
    assert abs(joint.sum() - 1.0) < 1e-9, joint.sum()
    cells = np.ravel_multi_index(tuple(samples.T), joint.shape)
    observed = np.bincount(cells, minlength=joint.size).astype(np.float64)
    probs = joint.reshape(-1)
    impossible = (probs == 0) & (observed > 0)
    if impossible.any():
        where = [np.unravel_index(i, joint.shape) for i in np.flatnonzero(impossible)[:5]]
        rows = observed[impossible].sum()
        raise AssertionError(f"samples in probability-zero cells {where} ({rows:.0f} rows)")
    expected = probs * len(samples)
    tested = expected >= min_expected
    f_obs, f_exp = list(observed[tested]), list(expected[tested])
    rest_obs, rest_exp = observed[~tested].sum(), expected[~tested].sum()
    if rest_exp >= min_expected:
        f_obs.append(rest_obs)
        f_exp.append(rest_exp)
    f_obs, f_exp = np.array(f_obs), np.array(f_exp)
    assert len(f_obs) >= 2, "too few testable cells"
    f_exp *= f_obs.sum() / f_exp.sum()
    return float(stats.chisquare(f_obs, f_exp).pvalue)


def check_eos_rows(tokens, lengths, eos: int, pad: int) -> int:
    """Checks every generated row: after its first EOS only `pad`, and `lengths` counts the
    tokens up to and including that EOS (the full width without one). Returns how many
    rows stopped at an EOS."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert lengths.shape == tokens.shape[:1], (lengths.shape, tokens.shape)
    stopped = 0
    for b, (row, length) in enumerate(zip(tokens, lengths, strict=True)):
        hits = np.flatnonzero(row == eos)
        if hits.size:
            stopped += 1
            assert length == hits[0] + 1, (b, row, length)
            assert np.all(row[hits[0] + 1 :] == pad), (b, row)
        else:
            assert length == len(row), (b, row, length)
    return stopped
