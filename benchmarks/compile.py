"""Compile time: what a notebook user waits for before the first token.

Each program is lowered and compiled from scratch (`jax.jit(...).lower(...).compile()`,
in-memory caches cleared first, no persistent cache) and timed beside its baseline from
the same run; the ratio is what counts on a shared machine:
  sample           `rtdlm.sampling.sample` (a full config: penalty, top-k, top-p, min-p;
                   a constant, and traced as in the decode loops) vs
                   `jax.random.categorical`, B in {1, 32}, V in {256, 32000, 128256}
  generate         bundled target, 64 new tokens, vs the same prefill + `lax.scan` loop
                   with argmax instead of the sampler
  speculative      `speculative_generate` (bundled draft, K=4) vs the same argmax loop
  notebook session 10 `generate` calls with new prompt lengths, max_new_tokens, configs,
                   seeds and stream callbacks: how many programs were compiled
  demo             `python -m rtdlm generate` (the `make demo` command) twice with a fresh
                   persistent cache directory: the first run's compile-or-load time

    python benchmarks/compile.py [--quick] [--save-results]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import add_output_arguments, environment, output_path, write_json  # noqa: E402
from rtdlm.decoding import generate, speculative_generate  # noqa: E402
from rtdlm.decoding import loop as loop_module  # noqa: E402
from rtdlm.models import encode, load_model  # noqa: E402
from rtdlm.sampling import SamplingConfig, sample  # noqa: E402

FULL = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
PROMPT = "import os\n\n\ndef main(argv):\n    "
REPO = Path(__file__).resolve().parent.parent


def compile_seconds(fn, *args, repeats: int = 1) -> float:
    """Median seconds of lower + compile of `jax.jit(fn)` on `args`, from a cold cache."""
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def sampler_rows(shapes, repeats):
    rows = []
    for batch, vocab in shapes:
        logits = jax.random.normal(jax.random.key(0), (batch, vocab)) * 3
        key = jax.random.key(1)
        ours = compile_seconds(lambda k, x: sample(k, x, FULL).token_id, key, logits, repeats=repeats)
        # The config as an argument (its values traced, as inside the decode loops): no branch
        # can be folded away at compile time.
        traced = compile_seconds(
            lambda k, x, c: sample(k, x, c).token_id, key, logits, FULL, repeats=repeats
        )
        base = compile_seconds(lambda k, x: jax.random.categorical(k, x), key, logits, repeats=repeats)
        rows.append(
            {
                "batch": batch,
                "vocab": vocab,
                "sample_s": ours,
                "sample_traced_config_s": traced,
                "categorical_s": base,
                "ratio": ours / base,
                "traced_config_ratio": traced / base,
            }
        )
        print(
            f"sample B={batch} V={vocab}: {ours:.2f} s (traced config {traced:.2f} s) vs categorical "
            f"{base:.2f} s ({ours / base:.1f}x, {traced / base:.1f}x)",
            flush=True,
        )
    return rows


def argmax_loop(model, prompt, new_tokens: int):
    """The baseline decode loop: prefill, then a `lax.scan` of argmax steps."""
    batch, width = prompt.shape
    cache = model.init_cache(batch, width + new_tokens)
    positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
    logits, cache = model(prompt, positions, cache)

    def step(carry, t):
        logits, cache = carry  # logits [B, V]
        token = jnp.argmax(logits, axis=-1)
        logits, cache = model(token[:, None], jnp.full((batch, 1), width + t), cache)
        return (logits[:, -1], cache), token

    return jax.lax.scan(step, (logits[:, -1], cache), jnp.arange(new_tokens))[1].T


def decoder_rows(new_tokens, repeats):
    target, draft = load_model("target"), load_model("draft")
    prompt = jnp.asarray(np.tile(encode(PROMPT)[None], (4, 1)))
    key = jax.random.key(0)
    common = dict(config=FULL, max_new_tokens=new_tokens)
    base = compile_seconds(lambda m, p: argmax_loop(m, p, new_tokens), target, prompt, repeats=repeats)
    ours = compile_seconds(
        lambda m, p, k: generate(m, p, key=k, **common).tokens, target, prompt, key, repeats=repeats
    )
    spec = compile_seconds(
        lambda m, d, p, k: speculative_generate(m, d, p, key=k, num_speculative_tokens=4, **common).tokens,
        target,
        draft,
        prompt,
        key,
        repeats=repeats,
    )
    print(f"generate {ours:.2f} s, speculative {spec:.2f} s, argmax loop {base:.2f} s", flush=True)
    return {
        "argmax_loop_s": base,
        "generate_s": ours,
        "speculative_s": spec,
        "generate_ratio": ours / base,
        "speculative_ratio": spec / base,
    }


def notebook_session():
    """10 varied calls, as in a notebook; counts the `generate` programs compiled."""
    jax.clear_caches()
    model = load_model("target")
    texts = ["def f(x):\n", "import sys\n\n", "class A:\n    def __init__(self):\n", "x = [", "# a comment\n"]
    calls = [
        dict(text=texts[i % 5], max_new_tokens=n, config=config, stream=stream)
        for i, (n, config, stream) in enumerate(
            [
                (20, SamplingConfig(temperature=0.7), None),
                (32, SamplingConfig(temperature=0.9, top_k=40), None),
                (24, SamplingConfig(temperature=0.7, seed=3), None),
                (30, SamplingConfig(temperature=0.0), None),
                (17, SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.2), None),
                (25, SamplingConfig(temperature=0.7), lambda step, tokens: None),
                (28, SamplingConfig(temperature=0.5, min_p=0.1), lambda step, tokens: None),
                (21, SamplingConfig(temperature=0.7, seed=9), None),
                (31, SamplingConfig(temperature=0.8), lambda step, tokens: None),
                (19, SamplingConfig(temperature=0.6, top_k=10), None),
            ]
        )
    ]
    before = loop_module._generate._cache_size()
    start = time.perf_counter()
    for call in calls:
        prompt = jnp.asarray(encode(call.pop("text"))[None])
        jax.block_until_ready(generate(model, prompt, key=jax.random.key(0), **call).tokens)
    jax.effects_barrier()
    seconds = time.perf_counter() - start
    compiled = loop_module._generate._cache_size() - before
    print(f"notebook session: 10 calls compiled generate {compiled} times ({seconds:.1f} s)", flush=True)
    return {"calls": 10, "generate_programs_compiled": compiled, "seconds": seconds}


def demo_runs():
    """`python -m rtdlm generate` twice with a fresh cache: the 'first run' seconds."""
    prompt = r"class Stack:\n    def __init__(self):\n"
    command = [sys.executable, "-m", "rtdlm", "generate", "--prompt", prompt, "--preset", "precise",
               "--max-new-tokens", "200"]  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory() as cache_home:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RTDLM_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")
        }
        env["XDG_CACHE_HOME"] = cache_home
        for _ in range(2):
            start = time.perf_counter()
            out = subprocess.run(
                command, capture_output=True, text=True, env=env, cwd=REPO, check=True
            ).stdout
            wall = time.perf_counter() - start
            first = float(re.search(r"first run ([0-9.]+) s", out).group(1))
            tokens = float(re.search(r"200 tokens \(1 row\) in ([0-9.]+) s", out).group(1))
            runs.append({"first_run_s": first, "generation_s": tokens, "wall_s": wall})
    for run in runs:  # the first run also generates 200 tokens: subtract the timed run's time
        run["compile_or_load_and_prefill_s"] = run["first_run_s"] - run["generation_s"]
    print(f"demo: {runs}", flush=True)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    repeats = 1 if args.quick else args.repeats
    shapes = [(1, 256), (32, 256)] if args.quick else [(b, v) for v in (256, 32000, 128256) for b in (1, 32)]
    payload = {"environment": environment(), "sample": sampler_rows(shapes, repeats)}
    payload["decoders"] = decoder_rows(8 if args.quick else 64, repeats)
    payload["notebook_session"] = notebook_session()
    if not args.quick:
        payload["demo"] = demo_runs()
    out = output_path(
        args, f"compile-{payload['environment']['device_slug']}{'-quick' if args.quick else ''}.json"
    )
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
