"""Shared timing helpers for the benchmarks (sampler, decode loop, speculative decoding).

Method: the work of many steps runs inside ONE compiled `lax.scan`, so a measurement holds
no Python dispatch and no host round trip per step. Every step's result is folded into a
scalar checksum that the program returns, so XLA cannot drop the work, and each step sees
inputs derived from the step index, so XLA cannot hoist it out of the loop. Compilation and
one warm-up run are excluded. Programs that are compared run interleaved in the same
process (round robin, order rotated each round, each program running about as long per
round as the slowest one), so a noisy neighbour slows them alike; report ratios of their
medians rather than absolute times.

Example:
    >>> program = scan_program(lambda step, x: jnp.argmax(x + step, axis=-1), 50, x)
    >>> samples = time_interleaved({"argmax": functools.partial(program, x)}, repeats=5)
    >>> summarize(samples["argmax"], steps=50)["us_per_step"]
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[..., jax.Array]


def scan_program(step_fn: StepFn, steps: int, *operands: Any) -> Callable[..., jax.Array]:
    """Compiles `steps` calls of `step_fn(step, *operands)` inside one `lax.scan`.

    Args:
      step_fn: `(step: int32 scalar, *operands) -> array` (e.g. `[B]` token ids). It must
        make its inputs depend on `step` (see `benchmarks.sampler.perturb`), or XLA may hoist
        its work out of the loop.
      steps: scan length.
      operands: example PyTrees of arrays. They are arguments of the compiled program
        (traced, not baked in as constants), so the program can be called again with other
        arrays of the same shapes and dtypes.

    Returns:
      The compiled program: `program(*operands) -> int32 checksum` (not blocked on).
      Compilation happens here, never in the timed calls; bind the operands with
      `functools.partial(program, *operands)` to get what `time_interleaved` takes.
    """

    def run(*args):
        def body(checksum, step):
            out = step_fn(step, *args)
            return checksum + jnp.sum(out.astype(jnp.int32)), None

        checksum, _ = lax.scan(body, jnp.int32(0), jnp.arange(steps, dtype=jnp.int32))
        return checksum

    return jax.jit(run).lower(*operands).compile()


Rounds = list[list[float]]  # per round, the wall seconds of each call made in that round


def time_interleaved(
    programs: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    max_calls_per_round: int = 16,
) -> dict[str, Rounds]:
    """Wall seconds of the programs' calls, in `repeats` round-robin rounds.

    Each program first runs `warmup` (>= 1) untimed times; the last of those estimates its
    call time. In every round each program then runs back to back about as long as ONE call
    of the slowest program (at least once, at most `max_calls_per_round` times), so a fast
    program is sampled many times under the same conditions (the same noisy neighbours) as
    a slow one. The order rotates every round, so no program always follows the same one.

    Returns:
      name -> rounds, each the list of that round's call times in seconds.
    """
    if warmup < 1 or repeats < 1:
        raise ValueError(f"need warmup >= 1 and repeats >= 1, got {warmup}, {repeats}")
    names = list(programs)
    estimate = {}
    for name in names:
        for _ in range(warmup):
            start = time.perf_counter()
            jax.block_until_ready(programs[name]())
            estimate[name] = time.perf_counter() - start
    slowest = max(estimate.values())
    calls = {
        name: int(min(max_calls_per_round, max(1, slowest // max(estimate[name], 1e-9))))
        for name in names
    }
    rounds: dict[str, Rounds] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times = []
            for _ in range(calls[name]):
                start = time.perf_counter()
                jax.block_until_ready(programs[name]())
                times.append(time.perf_counter() - start)
            rounds[name].append(times)
    return rounds


def _flat(rounds: Rounds) -> list[float]:
    return [t for calls in rounds for t in calls]


def summarize(rounds: Rounds, steps: int) -> dict[str, Any]:
    """Microseconds per step: the median over every timed call, the fastest call, and each
    round's median."""
    per_step = [t * 1e6 / steps for t in _flat(rounds)]
    return {
        "us_per_step": statistics.median(per_step),
        "us_per_step_min": min(per_step),
        "calls": len(per_step),
        "us_per_step_round_medians": [
            round(statistics.median(calls) * 1e6 / steps, 3) for calls in rounds
        ],
    }


def ratio(numerator: Rounds, denominator: Rounds) -> dict[str, float]:
    """`median(numerator) / median(denominator)` over all calls; the range of the per-round
    ratios of medians (both ran in the same round, so that range shows how much noise moved
    it); and the ratio of the fastest calls (the least disturbed by other processes)."""
    paired = [
        statistics.median(n) / statistics.median(d)
        for n, d in zip(numerator, denominator, strict=True)
    ]
    num, den = _flat(numerator), _flat(denominator)
    return {
        "ratio": statistics.median(num) / statistics.median(den),
        "paired_min": min(paired),
        "paired_max": max(paired),
        "ratio_of_min": min(num) / min(den),
    }


def device_slug(device: jax.Device | None = None) -> str:
    """`cpu` on CPU; otherwise the lower-cased device kind, e.g. `nvidia-h200`, `tpu-v5-lite`."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: jax.Device | None = None) -> str:
    """A human-readable description of the device the benchmark ran on."""
    device = device or jax.devices()[0]
    count = len(jax.devices())
    if device.platform == "cpu":
        return f"CPU: {_cpu_model()}, {os.cpu_count()} cores visible, {count} JAX device(s)"
    return f"{device.platform.upper()}: {device.device_kind} x{count}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """What a result file records about where and when it was measured."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "device": device_description(device),
        "device_slug": device_slug(device),
        "platform": device.platform,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "python_version": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_1_5_15min": load_average(),
    }


def load_average() -> list[float] | None:
    """The host's 1/5/15-minute load averages (other processes compete for the cores)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"  # committed: the results the README quotes
RUNS_DIR = BENCHMARKS_DIR.parent / "runs" / "benchmarks"  # git-ignored: the default


def add_output_arguments(parser) -> None:
    """`--out PATH` and `--save-results`, read by `output_path`."""
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON path, plots beside it (default: runs/benchmarks/NAME.json)")
    parser.add_argument("--save-results", action="store_true",
                        help="write to benchmarks/results/ (the committed results the README "
                             "quotes) instead of runs/benchmarks/")


def output_path(args, filename: str) -> Path:
    """Where a result goes: `--out`, else `filename` in benchmarks/results/ with
    `--save-results`, else in the git-ignored runs/benchmarks/, so that a plain run never
    overwrites a committed result."""
    if args.out is not None:
        return Path(args.out)
    return (RESULTS_DIR if args.save_results else RUNS_DIR) / filename


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Writes `payload` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
