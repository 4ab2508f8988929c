"""What every decoder shares: argument checks, the output type, one sampling step, and
writing a round's accepted tokens into the output."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from rtdlm.sampling import LogitsProcessor, SamplingConfig, row_keys, sample_with
from rtdlm.sampling.sharded import sharded_sample


@struct.dataclass
class GenerationOutput:
    """New tokens only. After a row's stop the rest of its row is `pad_token_id`."""

    tokens: jax.Array  # [B, max_new_tokens] int32
    lengths: jax.Array  # [B] new tokens per row, the stop included
    num_drafted: jax.Array | None = None  # [B] speculative only: draft tokens proposed
    num_accepted: jax.Array | None = None  # [B] speculative only: draft tokens accepted
    # [B, max_new_tokens] float32: each token's log-probability under the distribution it was
    # drawn from ("processed"; greedy rows: 0.0) or the model's log-softmax ("raw"); 0.0 after
    # the row's end.
    logprobs: jax.Array | None = None
    top_token_ids: jax.Array | None = None  # [B, N, k] with num_top_logprobs=k: most probable first
    top_logprobs: jax.Array | None = None  # [B, N, k] their logprobs (same mode; -inf: no mass)


LOGPROBS_MODES = ("processed", "raw")


def check_output_args(logprobs_mode, num_top_logprobs, num_samples) -> None:
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    for name, value, low in (("num_top_logprobs", num_top_logprobs, 0), ("num_samples", num_samples, 1)):
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def stop_sequences_array(stop_sequences, batch: int) -> jax.Array | None:
    """Stop sequences -> [B, M, L] int32, right-aligned, left-padded with -1 (None if none).

    `stop_sequences`: a list of token-id sequences for every row, or one such list per row
    (a list of B lists of sequences)."""
    if stop_sequences is None or len(stop_sequences) == 0:
        return None

    def is_sequence(x):
        return isinstance(x, (list, tuple, np.ndarray)) and all(_is_int(t) for t in x)

    if all(is_sequence(seq) for seq in stop_sequences):
        rows = [list(stop_sequences)] * batch
    elif len(stop_sequences) == batch and all(
        isinstance(row, (list, tuple)) and all(is_sequence(seq) for seq in row) for row in stop_sequences
    ):
        rows = [list(row) for row in stop_sequences]
    else:
        raise TypeError(
            "stop_sequences must be a list of token-id sequences, or one such list per prompt row "
            f"({batch} rows), got {stop_sequences!r}"
        )
    sequences = [[list(map(int, seq)) for seq in row] for row in rows]
    if any(len(seq) == 0 or min(seq) < 0 for row in sequences for seq in row):
        raise ValueError(f"stop_sequences must hold non-empty sequences of ids >= 0, got {stop_sequences!r}")
    count = max(len(row) for row in sequences)
    width = max((len(seq) for row in sequences for seq in row), default=1)
    out = np.full((batch, max(count, 1), width), -1, np.int32)
    for b, row in enumerate(sequences):
        for m, seq in enumerate(row):
            out[b, m, width - len(seq) :] = seq
    return jnp.asarray(out)


def expand_samples(num_samples: int, prompt, lengths, config: SamplingConfig, stop_sequences):
    """Each prompt row repeated `num_samples` times in a row (row b * n + i = sample i of
    prompt b), with its per-row config values and stop sequences. Per-row seeds become
    `seed * n + i`, so the samples of one prompt draw independently."""
    if num_samples == 1:
        return prompt, lengths, config, stop_sequences
    repeat = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    seed = config.seed
    if seed is not None and jnp.ndim(seed) == 1:
        sample_index = jnp.tile(jnp.arange(num_samples, dtype=jnp.uint32), jnp.shape(seed)[0])
        seed = repeat(jnp.asarray(seed, jnp.uint32)) * jnp.uint32(num_samples) + sample_index
    config = config.repeat_rows(num_samples).replace(seed=seed)
    stops = None if stop_sequences is None else repeat(stop_sequences)
    return repeat(prompt), repeat(lengths), config, stops


def vocab_size(model) -> int:
    """`model.vocab_size` if it is an int, else from one abstract (shape-only) forward pass."""
    if isinstance(getattr(model, "vocab_size", None), int):
        return model.vocab_size
    one = jnp.zeros((1, 1), jnp.int32)
    shape = jax.eval_shape(lambda m: m(one, one, m.init_cache(1, 1))[0], model)
    return shape.shape[-1]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_generation_args(
    model,
    prompt_tokens,
    prompt_lengths,
    max_new_tokens,
    config,
    extra_slots=0,
    extra_slots_for="",
    pad_token_id=0,
):
    """Python-side checks shared by every decoder. Returns (prompt [B, P], lengths [B], cache length).

    Concrete prompts are checked against the model's vocabulary (where it is known); inside
    `jit` an out-of-vocabulary id is read as the model reads it (the bundled model clamps)."""
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    config.check_complete()
    if not _is_int(pad_token_id) or not np.iinfo(np.int32).min <= pad_token_id <= np.iinfo(np.int32).max:
        raise TypeError(f"pad_token_id must be an int (int32), got {pad_token_id!r}")
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be [B, P] with P >= 1, got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt_tokens must be integer token ids, got {prompt.dtype}")
    batch, prompt_len = prompt.shape
    if prompt_lengths is None:
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
    else:
        lengths = prompt_lengths if isinstance(prompt_lengths, jax.Array) else np.asarray(prompt_lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"prompt_lengths must be integers, got {prompt_lengths!r}")
        if lengths.shape != (batch,):
            raise ValueError(f"prompt_lengths must have shape ({batch},), got {lengths.shape}")
        if not isinstance(lengths, jax.core.Tracer) and batch:
            host = np.asarray(lengths)
            if host.min() < 1 or host.max() > prompt_len:
                raise ValueError(f"prompt_lengths must be in [1, {prompt_len}], got {host.tolist()}")
        lengths = jnp.asarray(lengths, jnp.int32)
    if not isinstance(prompt, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer) and batch:
        vocab = getattr(model, "vocab_size", None)
        real = np.asarray(prompt)[np.arange(prompt_len)[None] < np.asarray(lengths)[:, None]]
        upper = vocab if isinstance(vocab, int) else np.iinfo(np.int32).max
        if real.min() < 0 or real.max() >= upper:
            raise ValueError(
                f"prompt_tokens must be token ids in [0, {upper}), got ids {real.min()}..{real.max()}"
            )
    rows = config.batch_size()
    if rows is not None and rows != batch:
        raise ValueError(f"SamplingConfig has per-row values for {rows} rows, the prompt has {batch}")
    cache_length = prompt_len + max_new_tokens + extra_slots
    model_max = getattr(model, "max_length", None)
    if isinstance(model_max, int) and cache_length > model_max:
        extra = f" + {extra_slots} slots for {extra_slots_for}" if extra_slots else ""
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}){extra} needs {cache_length} "
            f"cache slots, but the model supports max_length={model_max}"
        )
    return prompt.astype(jnp.int32), lengths, cache_length


def with_eos(config: SamplingConfig, eos_token_id, stop_token_ids=None) -> SamplingConfig:
    """`eos_token_id` and `stop_token_ids` (arguments) override the config's; they also feed
    min_new_tokens."""
    if eos_token_id is not None:
        if not _is_int(eos_token_id) or not -1 <= eos_token_id <= np.iinfo(np.int32).max:
            raise ValueError(f"eos_token_id must be a token id (int32) or -1, got {eos_token_id!r}")
        config = config.replace(eos_token_id=eos_token_id)
    if stop_token_ids is not None:
        config = config.replace(stop_token_ids=stop_token_ids)
    return config


MIN_BUCKET = 16
FINE_BUCKETS_ABOVE = 256  # from here, also 3/4 of each power of two: 384, 768, 1536, ...


def length_bucket(n: int) -> int:
    """The compiled width for a length n: the next power of two >= max(n, 16), or above 256
    the next of 3 * 2^k and 2^k. Long prompts then pad at most by a third, not double: the
    prefill is the one pass whose cost grows with the padding (a 341-token prompt: 384
    instead of 512 slots, 72 instead of 98 ms of prefill at B=1 on the bundled model)."""
    power = max(MIN_BUCKET, 1 << (int(n) - 1).bit_length())
    three_quarters = power // 4 * 3
    return three_quarters if power > FINE_BUCKETS_ABOVE and n <= three_quarters else power


def bucketed_widths(prompt_width: int, new_tokens: int, max_length) -> tuple[int, int]:
    """(prompt width, output width) to compile for, within the model's max_length."""
    prompt_bucket, output_bucket = length_bucket(prompt_width), length_bucket(new_tokens)
    if isinstance(max_length, int) and prompt_bucket + output_bucket > max_length:
        output_bucket = max(new_tokens, max_length - prompt_bucket)
        if prompt_bucket + output_bucket > max_length:  # the exact widths fit (checked)
            return prompt_width, new_tokens
    return prompt_bucket, output_bucket


def new_token_limits(max_new_tokens, prompt_tokens) -> tuple[np.ndarray, int]:
    """`max_new_tokens` (an int, or one per row of the prompt) -> ([B] int32 limits, their max)."""
    batch = np.shape(prompt_tokens)[0] if np.ndim(prompt_tokens) == 2 else 1
    if isinstance(max_new_tokens, jax.core.Tracer):
        raise TypeError("max_new_tokens must be concrete (an int or a [B] array): it sets the output width")
    limits = np.asarray(max_new_tokens)
    if limits.dtype == bool or not np.issubdtype(limits.dtype, np.integer) or limits.ndim > 1:
        raise TypeError(f"max_new_tokens must be an int or a [B] int array, got {max_new_tokens!r}")
    if limits.ndim == 1 and limits.shape != (batch,):
        raise ValueError(f"max_new_tokens as an array must have shape ({batch},), got {limits.shape}")
    if limits.size and limits.min() <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    limits = np.broadcast_to(limits, (batch,)).astype(np.int32)
    return limits, int(limits.max()) if batch else 1


def bucketed_prompt(prompt, width: int, max_length, extra_slots: int = 0):
    """(prompt right-padded to its bucket with id 0, output bucket, cache length) for a
    decoder whose cache holds prompt + output + `extra_slots`."""
    limit = max_length - extra_slots if isinstance(max_length, int) else None
    prompt_bucket, output_bucket = bucketed_widths(prompt.shape[1], width, limit)
    prompt = jnp.pad(prompt, ((0, 0), (0, prompt_bucket - prompt.shape[1])))  # id 0 is always valid
    return prompt, output_bucket, prompt_bucket + output_bucket + extra_slots


def trim(out: GenerationOutput, width: int) -> GenerationOutput:
    """The first `width` output positions of every [B, N, ...] field."""
    cut = lambda a: None if a is None else a[:, :width]
    return out.replace(
        tokens=cut(out.tokens),
        logprobs=cut(out.logprobs),
        top_token_ids=cut(out.top_token_ids),
        top_logprobs=cut(out.top_logprobs),
    )


TOKEN_LIST_BUCKET = 16  # logit_bias / banned_token_ids are padded to a multiple of this


def stable_structure(config: SamplingConfig) -> tuple[SamplingConfig, jax.Array]:
    """The config with a structure that common changes do not alter, so they do not
    recompile: `seed` None becomes 0 with the returned flag `seeded` False ([] bool; use
    `step_keys`), and `logit_bias` / `banned_token_ids` (None or any length) become arrays
    padded with -1 ids to a multiple of 16. Per-row ([B]) seeds and [N] -> [B, N] lists
    still change the structure."""
    seeded = jnp.asarray(config.seed is not None)
    if config.seed is None:
        config = config.replace(seed=np.uint32(0))
    pad = lambda n: -(-max(n, 1) // TOKEN_LIST_BUCKET) * TOKEN_LIST_BUCKET - n

    def padded(a, value):
        return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad(a.shape[-1]))], constant_values=value)

    bias = config.logit_bias
    if bias is None:
        bias = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    if not any(isinstance(x, jax.core.Tracer) for x in bias):
        ids, biases = np.asarray(bias[0], np.int32), np.asarray(bias[1], np.float32)
        config = config.replace(logit_bias=(padded(ids, -1), padded(biases, 0.0)))
    banned = config.banned_token_ids
    banned = np.zeros(0, np.int32) if banned is None else banned
    if not isinstance(banned, jax.core.Tracer):
        config = config.replace(banned_token_ids=padded(np.asarray(banned, np.int32), -1))
    return config, seeded


def step_keys(key, config: SamplingConfig, seeded, batch: int):
    """[B] keys of one step for a `stable_structure` config: as `row_keys` gives them for
    the original config (seed None when `seeded` is False)."""
    if jnp.ndim(config.seed) == 1:
        return row_keys(key, config, batch)
    # row_keys: split(fold_in(key, seed), B) when seeded, else split(key, B); one split.
    seeded_key = jax.random.fold_in(key, jnp.asarray(config.seed, jnp.uint32))
    return jax.random.split(jnp.where(seeded, seeded_key, key), batch)


def cond_in_place(pred, true_fun, false_fun, operand):
    """`lax.cond(pred, true_fun, false_fun, operand)` for branches that update a large
    operand (a KV cache) and return a value of its structure. Each branch is a
    `lax.while_loop` of at most one iteration, whose carry XLA updates in place; a
    conditional instead keeps a copy of its operand (measured on the bundled model's cache
    in a decode loop: 2x its memory, and a cache-sized copy per call)."""

    def at_most_once(fun, run, x):
        return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros((), bool), fun(c[1])), (run, x))[1]

    return at_most_once(false_fun, ~pred, at_most_once(true_fun, pred, operand))


def last_prompt_logits(logits, lengths):
    """[B, P, V] prefill logits -> [B, V] float32 at each row's last real prompt token."""
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)


class Step(struct.PyTreeNode):
    """One sampling step's tokens and what the outputs record about them."""

    token: jax.Array  # [B] int32
    logprob: jax.Array  # [B] float32
    top_ids: jax.Array  # [B, k] int32
    top_logprobs: jax.Array  # [B, k] float32


def record(logits, processed, tokens, logprobs_mode: str, num_top_logprobs: int):
    """Logprobs of `tokens` [...] and the top-k under the processed [..., V] logits or, with
    mode "raw", the model's own `logits` [..., V]: (logprob [...], top ids, top logprobs [..., k])."""
    scores = logits.astype(jnp.float32) if logprobs_mode == "raw" else processed
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    log_total = jnp.log(jnp.sum(jnp.exp(scores - row_max), axis=-1))
    chosen = jnp.take_along_axis(scores, tokens[..., None], axis=-1)[..., 0] - row_max[..., 0]
    top_values, top_ids = jax.lax.top_k(scores, num_top_logprobs)
    top_logprobs = top_values - row_max - log_total[..., None]
    return chosen - log_total, top_ids.astype(jnp.int32), top_logprobs


def sample_tokens(
    key,
    logits,
    config,
    processors: LogitsProcessor,
    state,
    mesh: Mesh | None = None,
    logprobs_mode: str = "processed",
    num_top_logprobs: int = 0,
    keys=None,
) -> Step:
    """One sampling step: [B, V] logits -> [B] tokens, processed with the processors' state.

    `keys` [B] replaces the per-row keys derived from `key` and `config.seed` (local path).

    With a `mesh` (axes "model" and optionally "data"), the logits and the state stay split
    over the vocabulary and the sampler runs where they lie (`rtdlm.sampling.sharded`); the
    logprobs then come from its result.
    """
    if mesh is not None:
        batch_axis = "data" if "data" in mesh.axis_names else None
        result = sharded_sample(
            mesh, key, logits, config, state=state, batch_axis=batch_axis, processors=processors
        )
        processed = None
    else:
        keys = row_keys(key, config, logits.shape[0]) if keys is None else keys
        result, processed = sample_with(keys, logits, config, state, processors, return_processed=True)
    token = result.token_id
    if logprobs_mode == "processed" and num_top_logprobs == 0:
        empty = jnp.zeros((token.shape[0], 0))
        return Step(token, result.logprob, empty.astype(jnp.int32), empty)
    if processed is None and logprobs_mode == "processed":
        # On a mesh the top logprobs need the whole processed row: gather it (costly, but
        # only on request).
        processed = processors.process(logits, config, state)
    return Step(token, *record(logits, processed, token, logprobs_mode, num_top_logprobs))


def recent_tokens(tokens, emitted, count: int):
    """[B, count]: the last `count` tokens written before `emitted` [B] in tokens [B, N]
    (-2 where the output has fewer)."""
    index = emitted[:, None] - count + jnp.arange(count)[None]
    recent = jnp.take_along_axis(tokens, jnp.maximum(index, 0), axis=1)
    return jnp.where(index >= 0, recent, -2)


def stop_hits(new, stop_ids, stop_sequences=None, recent=None):
    """[B, T] bool: whether new token t [B, T] is a stop id ([B, S], -1 = none) or the last
    token of a stop sequence ([B, M, L], right-aligned, -1 = left padding) whose earlier
    tokens are `recent` [B, L-1] (generated before `new`) then new[:, :t]."""
    hits = jnp.any(new[:, :, None] == stop_ids[:, None, :], axis=-1)
    if stop_sequences is None:
        return hits
    length = stop_sequences.shape[-1]
    window = jnp.concatenate([recent, new], axis=1)  # [B, L-1+T]
    index = jnp.arange(new.shape[1])[:, None] + jnp.arange(length)[None]  # [T, L]
    windows = window[:, index]  # [B, T, L]: the L tokens ending at new token t
    seqs = stop_sequences[:, None]  # [B, 1, M, L]
    match = jnp.all((seqs == -1) | (seqs == windows[:, :, None]), axis=-1)  # [B, T, M]
    real = jnp.any(stop_sequences >= 0, axis=-1)[:, None]  # [B, 1, M]: not an all-padding row
    return hits | jnp.any(match & real, axis=-1)


def write_rows(buffer, emitted, values, count):
    """Writes values[b, :count[b]] ([B, T, ...]) at buffer[b, emitted[b]:] ([B, N, ...]),
    cut at the buffer's width."""
    batch, width = buffer.shape[:2]
    slot = jnp.arange(values.shape[1])[None]
    index = jnp.where(slot < count[:, None], emitted[:, None] + slot, width)
    return buffer.at[jnp.arange(batch)[:, None], index].set(values, mode="drop")


class Emitted(struct.PyTreeNode):
    """What `emit_accepted` wrote for one round, per row."""

    tokens: jax.Array  # [B, N] the output with this round's tokens written
    count: jax.Array  # [B] tokens written this round (0 for finished rows)
    last: jax.Array  # [B] the last token written (the previous one where none was)
    done: jax.Array  # [B] finished after this round (a stop written, or the output is full)


def emit_accepted(
    tokens,
    emitted,
    last,
    done,
    drafts,
    num_accepted,
    next_token,
    eos,
    pad_token_id,
    stop_sequences=None,
    limit=None,
) -> Emitted:
    """Writes `drafts[:a]` then `next_token` after each row's `emitted` tokens, cut after a
    stop and at the row's limit; finished rows write nothing.

    tokens [B, N]; emitted [B]; last [B] the last token written so far; done [B] bool;
    drafts [B, K]; num_accepted [B] (a in [0, K]); next_token [B]; eos: the stop ids, [B]
    or [B, S] (-1: none); stop_sequences: [B, M, L] (see `stop_hits`) or None; limit: [B]
    tokens each row may emit (<= N; default N). Only generated tokens count toward a stop
    sequence; one may straddle rounds.
    """
    width = tokens.shape[1] if limit is None else limit
    batch, num_drafts = drafts.shape
    slot = jnp.arange(num_drafts + 1)[None]  # [1, K+1]
    new = jnp.where(slot < num_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
    new = jnp.where(slot <= num_accepted[:, None], new, pad_token_id)
    stop_ids = eos[:, None] if eos.ndim == 1 else eos
    recent = None
    if stop_sequences is not None:
        recent = recent_tokens(tokens, emitted, stop_sequences.shape[-1] - 1)
    is_stop = stop_hits(new, stop_ids, stop_sequences, recent) & (slot <= num_accepted[:, None])
    upto_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1) + 1, num_accepted + 1)
    count = jnp.where(done, 0, jnp.minimum(upto_stop, width - emitted)).astype(jnp.int32)  # [B]
    tokens = write_rows(tokens, emitted, new, count)
    last = jnp.where(count > 0, new[jnp.arange(batch), jnp.maximum(count - 1, 0)], last)
    done = done | jnp.any(is_stop & (slot < count[:, None]), 1) | (emitted + count >= width)
    return Emitted(tokens, count, last, done)


def outputs(final, num_top_logprobs: int, **speculative) -> GenerationOutput:
    """The `GenerationOutput` of a loop's final carry (fields tokens, emitted, logprobs,
    top_ids, top_logprobs)."""
    top = num_top_logprobs > 0
    return GenerationOutput(
        tokens=final.tokens,
        lengths=final.emitted,
        logprobs=final.logprobs,
        top_token_ids=final.top_ids if top else None,
        top_logprobs=final.top_logprobs if top else None,
        **speculative,
    )
