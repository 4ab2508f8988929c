"""Decode step time against the cache length: a windowed model should cost the same at any.

The bundled target attends to a sliding window of 256 positions. This measures its greedy
one-token decode step (inside one compiled `lax.scan`, no host round trip) at the last
`--steps` positions of caches of each `--cache-lengths`, interleaved. A generation of
N tokens allocates a cache of about P + N slots, so this is the per-token cost of a long
generation against a short one.

Usage: python benchmarks/decode_window.py [--cache-lengths 64,512,2048] [--batch 1]
       [--out benchmarks/results/decode-window-<device>-b<B>.json]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import environment, summarize, time_interleaved, write_json  # noqa: E402
from rtdlm.models import load_model  # noqa: E402


def step_program(model, batch: int, cache_length: int, steps: int):
    """A compiled run of `steps` greedy decode steps at positions cache_length - steps ..
    cache_length - 1 of a fresh cache of `cache_length` slots."""
    first = max(cache_length - steps, 0)

    @jax.jit
    def run(model):
        def step(carry, position):
            token, cache = carry
            logits, cache = model(token[:, None], jnp.full((batch, 1), position), cache)
            return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), None

        init = (jnp.zeros(batch, jnp.int32), model.init_cache(batch, cache_length))
        return jax.lax.scan(step, init, jnp.arange(first, cache_length))[0][0]

    return functools.partial(run, model), cache_length - first


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-lengths", default="64,512,2048")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)

    model = load_model("target")
    lengths = [int(n) for n in args.cache_lengths.split(",")]
    programs, steps = {}, {}
    for n in lengths:
        programs[n], steps[n] = step_program(model, args.batch, n, args.steps)
    seconds = time_interleaved(programs, repeats=args.repeats)
    rows = []
    for n in lengths:
        row = {"batch": args.batch, "cache_length": n, **summarize(seconds[n], steps[n])}
        rows.append(row)
        print(f"B={args.batch} cache {n}: {row['us_per_step']:.0f} us per step "
              f"(fastest {row['us_per_step_min']:.0f})")
    if args.out:
        write_json(args.out, {"environment": environment(), "step_time_by_cache_length": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
