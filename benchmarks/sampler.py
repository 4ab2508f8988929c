"""Sampler benchmark: rtdlm's sort-free `sample` against full-sort references, side by side.

Methods, timed in one process per shape and logits distribution:

  rtdlm_chain      rtdlm `sample`, SamplingConfig(temperature=0.7, top_k=50, top_p=0.9,
                   min_p=0.05, repetition_penalty=1.1), a 256-token history per row.
  sort_chain       the same semantics the way HF-Flax / Gemma / MaxText write it: repetition
                   penalty by gather/scatter on the history, temperature, top-k by sort, top-p
                   by descending sort + cumsum + scatter back, min-p, `jax.random.categorical`.
  rtdlm_top_p      rtdlm `sample`, SamplingConfig(temperature=0.7, top_p=0.9) (top-k off).
  sort_top_p       temperature + the full-sort top-p above + `jax.random.categorical`.
  rtdlm_temperature  rtdlm `sample`, SamplingConfig(temperature=0.7): no filter, so the
                   threshold search is skipped; one uniform per row (inverse CDF).
  categorical_T    `jax.random.categorical(key, logits / 0.7)` (temperature only: Gumbel
                   noise for every vocabulary entry).
  rtdlm_chain_no_history  the same chain without a history (no repetition penalty state).
  argmax           `jnp.argmax` (the floor: one read of the logits).
  hf_warpers       what a PyTorch user runs, on the CPU: Hugging Face transformers'
                   RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                   TopPLogitsWarper, MinPLogitsWarper and `torch.multinomial` (eager torch,
                   the same settings and history), when torch and transformers are installed.
  torch_sort_*     GPU only, when torch with CUDA is importable: the PyTorch servers' sort
                   fallback (torch.sort + cumsum + multinomial), eager, timed with CUDA events.

Each JAX method runs `--steps` sampling steps inside one compiled `lax.scan`
(`benchmarks/_timing.py`). Step s samples from `logits + 0.01 * s` with history
`(history + s) % V` and key `fold_in(key, s)`, identical for every method, so XLA can
neither hoist the work out of the loop nor share it across steps. Config values are passed
to the compiled programs as arguments (traced), as a decode loop would pass them.

Three logits distributions (float32, fixed seeds):

  lm-like  2.5 * N(0, 1) over the vocabulary, plus 8 "likely" tokens per row set to
           row_max + h * (1, 7/8, ..., 1/8) with h ~ U(2.5, 5) per row. At temperature 0.7
           the top token holds ~50% of the mass and the 0.9 nucleus is ~4 tokens (a few
           rows reach ~100): rtdlm's candidates (128 by default) cover every filter.
  flat     N(0, 1). The 0.9 nucleus at temperature 0.7 is ~14000 of 32000 tokens, so
           rtdlm's top-p-only path takes its exact full-vocabulary fallback (with top-k 50
           on, the chain stays on the fast path).
  lm-like-bf16  lm-like rounded to bfloat16 values (float32 arrays, as a bf16 model's
           logits after the upcast): many ties at the 128th-largest value, which once sent
           every batch down the full-vocabulary fallback.

Before timing, the kept sets of rtdlm's `process_logits` and of the reference chain are
compared on the benchmark's logits (`kept_sets`, in the JSON), to show they compute the same
thing. (With bfloat16 values a row can differ by a tie at the top-p crossing: rtdlm keeps
every token tied with the crossing token, the sort reference only those sorted before it.)
`rtdlm_fast_path_rows` counts the rows rtdlm's candidates cover (the batch takes the fast
path iff all do).

Usage:
  .venv/bin/python benchmarks/sampler.py                       # default shapes for the device
  .venv/bin/python benchmarks/sampler.py --shapes 32x32000 --steps 20 --repeats 7
  .venv/bin/python benchmarks/sampler.py --quick               # seconds
Writes `runs/benchmarks/sampler-<device>.json` (`-quick.json` with --quick) and a `.png`
beside it; `--save-results` writes to the committed `benchmarks/results/` instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `rtdlm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__" and any(arg.startswith("--devices") for arg in sys.argv):
    # Sharded sampler scaling; it must set XLA_FLAGS before JAX is imported.
    from benchmarks.sharded_sampler import main as sharded_main

    sys.exit(sharded_main(sys.argv[1:]))

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks._timing import (
    add_output_arguments,
    device_slug,
    environment,
    load_average,
    output_path,
    ratio,
    scan_program,
    summarize,
    time_interleaved,
    write_json,
)
from rtdlm.sampling import SamplingConfig, process_logits, sample
from rtdlm.sampling.filters import _candidate_keep

TEMPERATURE = 0.7
TOP_K = 50
TOP_P = 0.9
MIN_P = 0.05
REPETITION_PENALTY = 1.1
HISTORY_LENGTH = 256

CHAIN_CONFIG = SamplingConfig(
    temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P,
    repetition_penalty=REPETITION_PENALTY,
)
TOP_P_CONFIG = SamplingConfig(temperature=TEMPERATURE, top_p=TOP_P)
TEMPERATURE_CONFIG = SamplingConfig(temperature=TEMPERATURE)

DISTRIBUTIONS = {
    "lm-like": "2.5*N(0,1) plus 8 tokens per row at row_max + h*(1, 7/8, ..., 1/8), "
               "h ~ U(2.5, 5) per row",
    "flat": "N(0,1)",
    "lm-like-bf16": "lm-like rounded to bfloat16 values (float32 arrays)",
}
DEFAULT_SHAPES = {
    "cpu": ((8, 32000), (32, 32000), (8, 128256)),
    "accelerator": ((8, 32000), (64, 128256), (256, 128256)),
}
QUICK_SHAPES = ((4, 2000),)

# method name -> label in the plot
METHODS = {
    "rtdlm_chain": "rtdlm full chain",
    "rtdlm_chain_full_vocab": "rtdlm full chain, radix over the whole vocabulary",
    "sort_chain": "full-sort chain (JAX)",
    "rtdlm_top_p": "rtdlm top-p only",
    "sort_top_p": "full-sort top-p (JAX)",
    "rtdlm_temperature": "rtdlm temperature only",
    "categorical_T": "temperature-only categorical",
    "rtdlm_chain_no_history": "rtdlm full chain, no history",
    "argmax": "argmax (floor)",
    "hf_warpers": "Hugging Face torch warpers (CPU)",
    "torch_sort_chain": "PyTorch sort chain (CUDA)",
    "torch_sort_top_p": "PyTorch sort top-p (CUDA)",
}
RATIOS = {  # name -> (numerator method, denominator method)
    "full_chain_sort_over_rtdlm": ("sort_chain", "rtdlm_chain"),
    "top_p_sort_over_rtdlm": ("sort_top_p", "rtdlm_top_p"),
    "rtdlm_chain_over_argmax": ("rtdlm_chain", "argmax"),
    "rtdlm_chain_no_history_over_argmax": ("rtdlm_chain_no_history", "argmax"),
    "hf_warpers_over_rtdlm_chain": ("hf_warpers", "rtdlm_chain"),
    # > 1: the candidate fast path (lax.top_k) beats searching the whole vocabulary
    "full_vocab_over_candidates": ("rtdlm_chain_full_vocab", "rtdlm_chain"),
    "rtdlm_top_p_over_argmax": ("rtdlm_top_p", "argmax"),
    "categorical_over_rtdlm_chain": ("categorical_T", "rtdlm_chain"),
    "categorical_over_rtdlm_temperature": ("categorical_T", "rtdlm_temperature"),
    "torch_chain_over_rtdlm": ("torch_sort_chain", "rtdlm_chain"),
    "torch_top_p_over_rtdlm": ("torch_sort_top_p", "rtdlm_top_p"),
}


# ---- inputs --------------------------------------------------------------------------------
def make_logits(distribution: str, batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[B, V] float32 logits of the named distribution (see the module docstring)."""
    if distribution.endswith("-bf16"):  # the same values as the base distribution, rounded
        base = make_logits(distribution.removesuffix("-bf16"), batch, vocab, seed)
        return base.astype(jnp.bfloat16).astype(np.float32)
    rng = np.random.default_rng([seed, batch, vocab, list(DISTRIBUTIONS).index(distribution)])
    if distribution == "flat":
        return rng.standard_normal((batch, vocab), dtype=np.float32)
    if distribution != "lm-like":
        raise ValueError(f"unknown distribution {distribution!r}; choose from {list(DISTRIBUTIONS)}")
    logits = 2.5 * rng.standard_normal((batch, vocab), dtype=np.float32)
    num_likely = min(8, vocab)
    heights = rng.uniform(2.5, 5.0, batch)
    steps = np.linspace(1.0, 1.0 / num_likely, num_likely)
    for row in range(batch):
        likely = rng.choice(vocab, num_likely, replace=False)
        logits[row, likely] = logits[row].max() + (heights[row] * steps).astype(np.float32)
    return logits


def make_history(batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[B, 256] int32 random token ids (no padding)."""
    rng = np.random.default_rng([seed, batch, vocab, 99])
    return rng.integers(0, vocab, (batch, HISTORY_LENGTH), dtype=np.int32)


def perturb(step, logits, history, key):
    """What step `step` samples from: shifted logits, shifted history, a fresh key."""
    shifted = logits + 0.01 * step.astype(logits.dtype)
    return shifted, (history + step) % logits.shape[-1], jax.random.fold_in(key, step)


# ---- the full-sort reference (HF-Flax / Gemma / MaxText style) ----------------------------
def reference_process(
    logits: jax.Array,
    params: dict[str, jax.Array],
    history: jax.Array | None = None,
    *,
    top_k: bool = True,
    min_p: bool = True,
) -> jax.Array:
    """The same chain as rtdlm's default order, written with full sorts; removed -> -inf.

    logits [B, V] float32; params: temperature, top_p, and (if used) top_k, min_p,
    repetition_penalty as scalars; history [B, H] int (-1 = padding) or None.
    """
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    x = logits
    if history is not None:  # HF: gather the seen logits, penalise, scatter them back
        ids = jnp.where(history < 0, vocab, history)
        seen = jnp.take_along_axis(x, jnp.minimum(ids, vocab - 1), axis=-1)  # [B, H]
        penalty = params["repetition_penalty"]
        seen = jnp.where(seen < 0, seen * penalty, seen / penalty)
        x = x.at[rows, ids].set(seen, mode="drop")
    x = x / params["temperature"]
    if top_k:  # k-th largest from an ascending sort; ties with it kept
        ascending = jnp.sort(x, axis=-1)
        kth = lax.dynamic_index_in_dim(ascending, vocab - params["top_k"], axis=1, keepdims=False)
        x = jnp.where(x < kth[:, None], -jnp.inf, x)
    # top-p: descending sort, cumulative mass, keep while the mass before a token is < p
    order = jnp.argsort(x, axis=-1, descending=True)  # [B, V]
    probs = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < params["top_p"]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)  # scatter back
    x = jnp.where(keep, x, -jnp.inf)
    if min_p:  # relative to the most probable kept token
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < params["min_p"] * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, x)
    return x


def reference_params(chain: bool) -> dict[str, jax.Array]:
    params = {"temperature": jnp.float32(TEMPERATURE), "top_p": jnp.float32(TOP_P)}
    if chain:
        params.update(top_k=jnp.int32(TOP_K), min_p=jnp.float32(MIN_P),
                      repetition_penalty=jnp.float32(REPETITION_PENALTY))
    return params


# ---- step functions: (step, logits, history, key, extra) -> [B] token ids -----------------
def step_rtdlm_chain(step, logits, history, key, config):
    x, h, k = perturb(step, logits, history, key)
    return sample(k, x, config, token_history=h).token_id


def step_rtdlm_no_history(step, logits, history, key, config):
    x, _, k = perturb(step, logits, history, key)
    return sample(k, x, config).token_id


def step_sort_chain(step, logits, history, key, params):
    x, h, k = perturb(step, logits, history, key)
    return jax.random.categorical(k, reference_process(x, params, h), axis=-1)


def step_sort_top_p(step, logits, history, key, params):
    x, _, k = perturb(step, logits, history, key)
    processed = reference_process(x, params, top_k=False, min_p=False)
    return jax.random.categorical(k, processed, axis=-1)


def step_categorical(step, logits, history, key, temperature):
    x, _, k = perturb(step, logits, history, key)
    return jax.random.categorical(k, x / temperature, axis=-1)


def step_argmax(step, logits, history, key, _):
    x, _, _ = perturb(step, logits, history, key)
    return jnp.argmax(x, axis=-1)


def jax_methods() -> dict[str, tuple[Callable[..., jax.Array], Any]]:
    """method -> (step function, its extra traced operand)."""
    return {
        "rtdlm_chain": (step_rtdlm_chain, CHAIN_CONFIG),
        # no candidate set: the radix threshold searches run over all V logits
        "rtdlm_chain_full_vocab": (step_rtdlm_chain, CHAIN_CONFIG.replace(num_candidates=2**31 - 1)),
        "sort_chain": (step_sort_chain, reference_params(chain=True)),
        "rtdlm_chain_no_history": (step_rtdlm_no_history, CHAIN_CONFIG),
        "rtdlm_top_p": (step_rtdlm_no_history, TOP_P_CONFIG),
        "rtdlm_temperature": (step_rtdlm_no_history, TEMPERATURE_CONFIG),
        "sort_top_p": (step_sort_top_p, reference_params(chain=False)),
        "categorical_T": (step_categorical, jnp.float32(TEMPERATURE)),
        "argmax": (step_argmax, None),
    }


# ---- checks: same kept sets, and the size of what is kept ---------------------------------
@jax.jit
def _processed_pairs(logits, history, chain_config, top_p_config, chain_params, top_p_params):
    """rtdlm's and the reference's processed logits for both configs (compiled per shape)."""
    return {
        "chain": (process_logits(logits, chain_config, history),
                  reference_process(logits, chain_params, history)),
        "top_p": (process_logits(logits, top_p_config),
                  reference_process(logits, top_p_params, top_k=False, min_p=False)),
    }


@jax.jit
def _fast_path_rows(logits, chain_config, top_p_config):
    """Rows whose truncation rtdlm's candidates provably cover, per config, on logits /
    temperature (the chain's repetition penalty is left out: it moves only history tokens)."""
    rows = {}
    for name, c in (("chain", chain_config), ("top_p", top_p_config)):
        params = [jnp.broadcast_to(v, logits.shape[:1]) for v in (c.top_k, c.top_p, c.min_p, c.typical_p)]
        rows[name] = jnp.sum(_candidate_keep(logits / c.temperature, *params, c.num_candidates)[1])
    return rows


def kept_sets(logits: np.ndarray, history: np.ndarray) -> dict[str, Any]:
    """Per config: rows where rtdlm and the reference keep different tokens, kept sizes."""
    pairs = _processed_pairs(jnp.asarray(logits), jnp.asarray(history), CHAIN_CONFIG,
                             TOP_P_CONFIG, reference_params(True), reference_params(False))
    fast_rows = _fast_path_rows(jnp.asarray(logits), CHAIN_CONFIG, TOP_P_CONFIG)
    out = {}
    for name, (ours, theirs) in pairs.items():
        ours, theirs = np.isfinite(np.asarray(ours)), np.isfinite(np.asarray(theirs))
        kept = ours.sum(axis=-1)
        out[name] = {
            "rows_differing": int(np.sum(np.any(ours != theirs, axis=-1))),
            "kept_per_row_median": float(np.median(kept)),
            "kept_per_row_max": int(kept.max()),
            # inferred: rtdlm stays on its candidate fast path when every row's kept set
            # fits in its `num_candidates` largest logits (else one lax.cond fallback)
            "rtdlm_fast_path_expected": bool(kept.max() <= CHAIN_CONFIG.num_candidates),
            # measured (filters._candidate_keep): the batch takes the fast path iff all rows
            "rtdlm_fast_path_rows": int(fast_rows[name]),
        }
    return out


def nucleus_sizes(logits: np.ndarray) -> dict[str, float]:
    """Size of the 0.9 nucleus at temperature 0.7, no other filter (numpy, float64)."""
    z = logits.astype(np.float64) / TEMPERATURE
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p = -np.sort(-p / p.sum(axis=-1, keepdims=True), axis=-1)
    sizes = np.sum(np.cumsum(p, axis=-1) - p < TOP_P, axis=-1)
    return {"median": float(np.median(sizes)), "max": int(sizes.max()),
            "top1_probability_median": float(np.median(p[:, 0]))}


# ---- Hugging Face's torch warpers (CPU) ----------------------------------------------------
def hf_warpers_program(logits: np.ndarray, history: np.ndarray, steps: int) -> Callable[[], int] | None:
    """A call that runs `steps` eager steps of transformers' warper chain + multinomial (the
    same perturbation as the JAX methods), or None without torch/transformers."""
    try:
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )
    except ImportError:
        return None
    warpers = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY), TemperatureLogitsWarper(TEMPERATURE),
        TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P), MinPLogitsWarper(MIN_P),
    ])
    base, base_history = torch.from_numpy(logits), torch.from_numpy(history).long()
    vocab = base.shape[-1]
    generator = torch.Generator().manual_seed(0)

    def run() -> int:
        total = 0
        with torch.inference_mode():
            for step in range(steps):
                scores = warpers((base_history + step) % vocab, base + 0.01 * step)
                probs = torch.softmax(scores, dim=-1)
                total += int(torch.multinomial(probs, 1, generator=generator).sum())
        return total

    return run


# ---- PyTorch (GPU only) --------------------------------------------------------------------
def torch_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def time_torch(logits: np.ndarray, history: np.ndarray, steps: int, repeats: int):
    """Seconds of `steps` eager steps of the PyTorch sort samplers (CUDA events), as
    `time_interleaved`'s rounds: one call per round.

    The same semantics and per-step perturbation as the JAX methods; top-k/top-p masks the
    way vLLM's sort fallback does (ascending sort, `cumsum <= 1 - p` removed).
    """
    import torch

    device = torch.device("cuda")
    base = torch.from_numpy(logits).to(device)
    base_history = torch.from_numpy(history).long().to(device)
    vocab = base.shape[-1]
    generator = torch.Generator(device=device)
    generator.manual_seed(0)

    def top_k_top_p(x, use_top_k):
        ascending, order = torch.sort(x, dim=-1)
        if use_top_k:
            kth = ascending[:, vocab - TOP_K].unsqueeze(1)
            ascending = ascending.masked_fill(ascending < kth, -float("inf"))
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - TOP_P
        remove[:, -1] = False
        ascending = ascending.masked_fill(remove, -float("inf"))
        return torch.empty_like(ascending).scatter_(1, order, ascending)

    def chain(step):
        x = base + 0.01 * step
        ids = (base_history + step) % vocab
        seen = torch.gather(x, 1, ids)
        seen = torch.where(seen < 0, seen * REPETITION_PENALTY, seen / REPETITION_PENALTY)
        x = x.scatter(1, ids, seen) / TEMPERATURE
        probs = top_k_top_p(x, use_top_k=True).softmax(dim=-1)
        probs = probs.masked_fill(probs < MIN_P * probs.amax(dim=-1, keepdim=True), 0.0)
        return torch.multinomial(probs, 1, generator=generator)

    def top_p_only(step):
        x = (base + 0.01 * step) / TEMPERATURE
        probs = top_k_top_p(x, use_top_k=False).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)

    def run(step_fn):
        total = torch.zeros((), dtype=torch.long, device=device)
        for step in range(steps):
            total += step_fn(step).sum()
        return total

    programs = {"torch_sort_chain": chain, "torch_sort_top_p": top_p_only}
    seconds: dict[str, list[list[float]]] = {name: [] for name in programs}
    with torch.inference_mode():
        for fn in programs.values():
            run(fn)
        torch.cuda.synchronize()
        for r in range(repeats):
            names = list(programs)
            for name in names[r % 2:] + names[:r % 2]:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run(programs[name])
                end.record()
                torch.cuda.synchronize()
                seconds[name].append([start.elapsed_time(end) / 1e3])
    return seconds


# ---- driver --------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            batch, vocab = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxV, e.g. 32x32000") from None
        if batch < 1 or vocab < 2:
            raise argparse.ArgumentTypeError(f"shape {item!r}: need B >= 1 and V >= 2")
        shapes.append((batch, vocab))
    return shapes


def compiled_ops(program) -> dict[str, int]:
    """Counts of the ops that decide the cost in a compiled program's HLO. On CPU, XLA turns
    `lax.top_k` into a full sort unless its sort + slice pattern is rewritten back into a
    `TopK` custom call; a `sort` in rtdlm's programs means its fast path lost that."""
    text = program.as_text()
    return {"topk": text.count('custom_call_target="TopK"'), "sort": text.count(" sort("),
            "while": text.count(" while("), "conditional": text.count(" conditional(")}


def compile_methods(batch: int, vocab: int, steps: int, methods=None):
    """For one shape: method -> compiled scan program `(logits, history, key) -> checksum`,
    and method -> `compiled_ops` of it (`methods`: the names to compile, default all)."""
    x = jax.ShapeDtypeStruct((batch, vocab), jnp.float32)
    h = jax.ShapeDtypeStruct((batch, HISTORY_LENGTH), jnp.int32)
    key = jax.random.key(0)
    compiled, ops = {}, {}
    for name, (step_fn, extra) in jax_methods().items():
        if methods is not None and name not in methods:
            continue
        program = scan_program(step_fn, steps, x, h, key, extra)
        compiled[name] = _with_last_operand(program, extra)
        ops[name] = compiled_ops(program)
    return compiled, ops


def _with_last_operand(program, extra):
    return lambda logits, history, key: program(logits, history, key, extra)


def run_case(batch, vocab, distribution, programs, ops, steps, repeats, use_torch, methods=None):
    logits = make_logits(distribution, batch, vocab)
    history = make_history(batch, vocab)
    operands = (jnp.asarray(logits), jnp.asarray(history), jax.random.key(0))
    calls = {name: functools.partial(program, *operands) for name, program in programs.items()}
    wanted = (methods is None or "hf_warpers" in methods) and jax.default_backend() == "cpu"
    hf_warpers = hf_warpers_program(logits, history, steps) if wanted else None
    if hf_warpers is not None:
        calls["hf_warpers"] = hf_warpers
    seconds = time_interleaved(calls, repeats)
    torch_error = None
    if use_torch:
        try:
            seconds.update(time_torch(logits, history, steps, repeats))
        except Exception as error:  # report, and keep the JAX numbers
            torch_error = f"{type(error).__name__}: {error}"
            print(f"  torch timing failed: {torch_error}", file=sys.stderr)
    case = {
        "shape": f"{batch}x{vocab}", "B": batch, "V": vocab, "distribution": distribution,
        "nucleus_0.9_at_T0.7": nucleus_sizes(logits),
        "kept_sets": kept_sets(logits, history),
        "compiled_ops": ops,
        "methods": {name: summarize(s, steps) for name, s in seconds.items()},
        "ratios": {
            name: ratio(seconds[num], seconds[den])
            for name, (num, den) in RATIOS.items() if num in seconds and den in seconds
        },
    }
    if torch_error:
        case["torch_error"] = torch_error
    return case


def print_case(case: dict[str, Any]) -> None:
    print(f"{case['shape']:>12} {case['distribution']:<8} nucleus(0.9) median "
          f"{case['nucleus_0.9_at_T0.7']['median']:.0f}, kept-set rows differing "
          f"{case['kept_sets']['chain']['rows_differing']} (chain) "
          f"{case['kept_sets']['top_p']['rows_differing']} (top-p); candidates cover "
          f"{case['kept_sets']['chain']['rtdlm_fast_path_rows']} (chain) "
          f"{case['kept_sets']['top_p']['rtdlm_fast_path_rows']} (top-p) of {case['B']} rows")
    for name, timing in case["methods"].items():
        ops = case["compiled_ops"].get(name)
        ops = f"  (HLO: {ops['topk']} TopK, {ops['sort']} sort)" if ops else ""
        print(f"    {name:<18} {timing['us_per_step']:>12.1f} us/step, {timing['calls']:>3} calls{ops}")
    for name, r in case["ratios"].items():
        print(f"    {name:<30} {r['ratio']:8.2f}x  (per round {r['paired_min']:.2f}"
              f"..{r['paired_max']:.2f}; fastest calls {r['ratio_of_min']:.2f}x)")


def _shape_label(case: dict[str, Any]) -> str:
    """`B x V` and the speed-ups over the sort references, for the x axis."""
    ratios = case["ratios"]
    lines = [f"B x V = {case['shape']}"]
    for name, label in (("full_chain_sort_over_rtdlm", "chain"), ("top_p_sort_over_rtdlm", "top-p")):
        if name in ratios:
            lines.append(f"sort / rtdlm, {label}: {ratios[name]['ratio']:.1f}x")
    return "\n".join(lines)


def plot(cases: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distributions = [d for d in DISTRIBUTIONS if any(c["distribution"] == d for c in cases)]
    methods = [m for m in METHODS if any(m in c["methods"] for c in cases)]
    fig, axes = plt.subplots(1, len(distributions), figsize=(6.5 * len(distributions), 5.4),
                             squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    for ax, distribution in zip(axes[0], distributions, strict=True):
        subset = [c for c in cases if c["distribution"] == distribution]
        positions = np.arange(len(subset))
        for i, method in enumerate(methods):
            values = [c["methods"].get(method, {}).get("us_per_step", np.nan) for c in subset]
            ax.bar(positions + (i - (len(methods) - 1) / 2) * width, values, width,
                   label=METHODS[method], color=f"C{i}")
        ax.set_xticks(positions, [_shape_label(c) for c in subset], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{distribution} logits: {DISTRIBUTIONS[distribution]}", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("microseconds per sampling step (median, log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(payload: dict[str, Any], path: Path) -> None:
    """Draws the plot of a result file's payload (as `main` writes it) to `path`."""
    cases = [dict(case, methods={}) for case in payload["cases"]]
    by_key = {(c["shape"], c["distribution"]): c for c in cases}
    for row in payload["results"]:
        timing = {k: v for k, v in row.items() if k not in ("shape", "distribution", "method")}
        by_key[row["shape"], row["distribution"]]["methods"][row["method"]] = timing
    title = (f"rtdlm sampler benchmark: {payload['device']}, jax {payload['jax_version']}, "
             f"{payload['date']}")
    plot(cases, title, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    platform = jax.devices()[0].platform
    kind = "cpu" if platform == "cpu" else "accelerator"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated BxV (default: "
                             + ", ".join(f"{b}x{v}" for b, v in DEFAULT_SHAPES[kind]) + ")")
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS),
                        help=f"comma-separated, from {list(DISTRIBUTIONS)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps inside one compiled scan (default 20 CPU, 50 else)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per method; the median is reported (default 5 CPU, 20)")
    add_output_arguments(parser)
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the methods to time (default: all; "
                             "the full-sort references take seconds per step at large shapes)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: one tiny shape, 2 steps, 2 repeats")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only redraw the plot of an existing result file (no timing)")
    args = parser.parse_args(argv)
    if args.replot:
        payload = json.loads(args.replot.read_text())
        replot(payload, args.replot.with_suffix(".png"))
        return payload

    slug = device_slug()
    if args.quick:
        shapes = args.shapes or list(QUICK_SHAPES)
        steps, repeats = args.steps or 2, args.repeats or 2
        out = output_path(args, f"sampler-{slug}-quick.json")
    else:
        shapes = args.shapes or list(DEFAULT_SHAPES[kind])
        steps = args.steps or (20 if kind == "cpu" else 50)
        repeats = args.repeats or (5 if kind == "cpu" else 20)
        out = output_path(args, f"sampler-{slug}.json")
    distributions = [d.strip() for d in args.distributions.split(",") if d.strip()]
    unknown = sorted(set(distributions) - set(DISTRIBUTIONS))
    if unknown or not distributions:
        parser.error(f"unknown distribution(s) {unknown}; choose from {list(DISTRIBUTIONS)}")
    if steps < 1 or repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    use_torch = platform == "gpu" and torch_available()
    methods = None if args.methods is None else {m.strip() for m in args.methods.split(",")}
    if methods is not None and not methods <= set(METHODS):
        parser.error(f"unknown method(s) {sorted(methods - set(METHODS))}; choose from {list(METHODS)}")

    env = environment()
    print(f"{env['device']}; jax {env['jax_version']}; load {env['load_average_1_5_15min']}; "
          f"{steps} steps/scan, {repeats} repeats"
          f"{'; torch on' if use_torch else '; torch skipped (needs torch + CUDA)'}")
    cases = []
    for batch, vocab in shapes:
        programs, ops = compile_methods(batch, vocab, steps, methods)
        for distribution in distributions:
            cases.append(
                run_case(batch, vocab, distribution, programs, ops, steps, repeats, use_torch, methods))
            print_case(cases[-1])

    payload = {
        **env,
        "benchmark": "sampler",
        "timing": f"median over all timed calls of one compiled lax.scan of {steps} steps, in "
                  f"{repeats} round-robin rounds where each method runs about as long as one "
                  "call of the slowest (1 to 16 calls); compile and warm-up excluded. torch: "
                  "an eager loop of the same steps per round, timed with CUDA events",
        "steps": steps,
        "repeats": repeats,
        "quick": args.quick,
        "distributions": DISTRIBUTIONS,
        "methods": METHODS,
        "ratio_definitions": {name: f"{num} / {den}" for name, (num, den) in RATIOS.items()},
        "configs": {
            "rtdlm_chain": f"SamplingConfig(temperature={TEMPERATURE}, top_k={TOP_K}, "
                           f"top_p={TOP_P}, min_p={MIN_P}, repetition_penalty="
                           f"{REPETITION_PENALTY}), token_history [B, {HISTORY_LENGTH}]",
            "rtdlm_top_p": f"SamplingConfig(temperature={TEMPERATURE}, top_p={TOP_P})",
            "rtdlm_temperature": f"SamplingConfig(temperature={TEMPERATURE})",
            "num_candidates": CHAIN_CONFIG.num_candidates,
        },
        "torch": "timed" if use_torch else "skipped: needs a GPU and torch with CUDA",
        "results": [
            {"shape": c["shape"], "distribution": c["distribution"], "method": name, **timing}
            for c in cases for name, timing in c["methods"].items()
        ],
        "cases": [{k: v for k, v in c.items() if k != "methods"} for c in cases],
    }
    payload["load_average_at_end_1_5_15min"] = load_average()
    write_json(out, payload)
    png = out.with_suffix(".png")
    replot(payload, png)
    print(f"wrote {out} and {png}")
    return payload


if __name__ == "__main__":
    main()
