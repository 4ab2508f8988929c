"""Beam search cost: `beam_search` at k = 4 beams, B = 4 prompts (16 running rows) against
`generate` at B = 16 (greedy) on the bundled target model, same run, interleaved repeats,
medians and their ratio (target: <= 1.5x). Beam search stops early once every prompt is done,
so EOS is off here: both run all `max_new_tokens` steps.

Usage: python benchmarks/beam_search.py [--quick] [--repeats N] [--out PATH | --save-results]
(default output: runs/benchmarks/beam-search-<device>.json; --save-results: benchmarks/results/)
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import (  # noqa: E402
    add_output_arguments,
    environment,
    load_average,
    output_path,
    ratio,
    summarize,
    time_interleaved,
    write_json,
)
from rtdlm.decoding import beam_search, generate  # noqa: E402
from rtdlm.models import create_model, encode, load_model  # noqa: E402
from rtdlm.sampling import SamplingConfig  # noqa: E402

PROMPT = "import os\n\n\ndef main(argv):\n    "


def bench(model, num_beams, batch, max_new_tokens, repeats):
    prompt = jnp.asarray(np.tile(encode(PROMPT)[None], (batch * num_beams, 1)))  # [B*k, P]
    greedy = SamplingConfig(do_sample=False)
    run_generate = functools.partial(
        generate, model, prompt, key=jax.random.key(0), config=greedy, max_new_tokens=max_new_tokens
    )
    run_beams = functools.partial(
        beam_search, model, prompt[:batch], num_beams=num_beams, max_new_tokens=max_new_tokens
    )
    programs = {
        f"generate_b{batch * num_beams}": lambda: run_generate().tokens,
        f"beam_search_k{num_beams}_b{batch}": lambda: run_beams().tokens,
    }
    seconds = time_interleaved(programs, repeats=repeats)
    names = list(programs)
    result = {name: summarize(values, max_new_tokens) for name, values in seconds.items()}
    result["beam_vs_generate"] = ratio(seconds[names[1]], seconds[names[0]])
    result.update(num_beams=num_beams, batch=batch, new_tokens=max_new_tokens)
    print(
        f"{names[0]} {result[names[0]]['us_per_step']:.0f} us/step, {names[1]} "
        f"{result[names[1]]['us_per_step']:.0f} us/step: ratio {result['beam_vs_generate']['ratio']:.2f}"
    )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=7)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        result = bench(create_model("configs/models/tiny.yaml", rngs=0), 2, 2, 8, repeats=2)
    else:
        result = bench(load_model("target"), 4, 4, 128, repeats=args.repeats)
    env = environment()
    out = output_path(args, f"beam-search-{env['device_slug']}{'-quick' if args.quick else ''}.json")
    write_json(out, {"environment": env, "load_average_after": load_average(), "result": result})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
