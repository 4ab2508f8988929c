"""Sharded-sampler benchmark: `rtdlm.sharding.sharded_sample` on 1..N devices against the
single-device `sample`, same logits, config and key, side by side in one process.

The vocabulary is split over a "model" mesh axis of n devices (1, 2, 4, ... up to N); each
step samples from `[B, V]` float32 logits with the full chain (temperature 0.7, top-k 50,
top-p 0.9, min-p 0.05, repetition penalty 1.1 over a 64-token history). Steps run inside one
compiled `lax.scan` (`benchmarks/_timing.py`). On a CPU the "devices" are host devices
sharing the same cores (`--xla_force_host_platform_device_count`), so this measures the
overhead of the collectives, not a speedup; real accelerators give each shard its own chip.

  python benchmarks/sharded_sampler.py --devices 8            # B=64, V=128256
  python benchmarks/sampler.py --devices 8                     # the same, via sampler.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--shape", default="64x128256")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="result JSON path (default: runs/benchmarks/NAME.json)")
    parser.add_argument("--save-results", action="store_true",
                        help="write to the committed benchmarks/results/ instead of runs/benchmarks/")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:  # host devices must be requested before JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from benchmarks._timing import (
        environment,
        output_path,
        ratio,
        scan_program,
        summarize,
        time_interleaved,
        write_json,
    )
    from rtdlm.sampling import SamplingConfig, sample
    from rtdlm.sharding import sharded_sample

    batch, vocab = (int(x) for x in args.shape.split("x"))
    devices = jax.devices()[: args.devices]
    config = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    rng = np.random.default_rng(0)
    logits = (2.5 * rng.standard_normal((batch, vocab))).astype(np.float32)
    history = rng.integers(0, vocab, (batch, 64)).astype(np.int32)

    def single(step, logits, history):
        return sample(
            jax.random.fold_in(jax.random.key(0), step), logits + 0.01 * step, config, history
        ).token_id

    programs, tokens = {"single_device": None}, {}
    one = jax.device_put(logits, devices[0])
    compiled = scan_program(single, args.steps, one, jnp.asarray(history))
    programs["single_device"] = lambda: compiled(one, jnp.asarray(history))
    tokens["single_device"] = np.asarray(jax.jit(single)(0, one, jnp.asarray(history)))
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= len(devices) and vocab % n == 0]
    for n in sizes:
        mesh = jax.sharding.Mesh(
            np.array(devices[:n]).reshape(1, n),
            ("data", "model"),
            axis_types=(jax.sharding.AxisType.Auto,) * 2,
        )
        split = jax.device_put(logits, NamedSharding(mesh, P(None, "model")))

        def sharded(step, logits, history, mesh=mesh):
            key = jax.random.fold_in(jax.random.key(0), step)
            return sharded_sample(mesh, key, logits + 0.01 * step, config, history, batch_axis=None).token_id

        program = scan_program(sharded, args.steps, split, jnp.asarray(history))
        programs[f"sharded_{n}"] = lambda program=program, split=split: program(split, jnp.asarray(history))
        tokens[f"sharded_{n}"] = np.asarray(jax.jit(sharded)(0, split, jnp.asarray(history)))
    seconds = time_interleaved(programs, args.repeats)
    rows = []
    for name, values in seconds.items():
        row = {
            "method": name,
            "devices": 1 if name == "single_device" else int(name.split("_")[1]),
            **summarize(values, args.steps),
            "same_tokens_as_single_device": bool(np.array_equal(tokens[name], tokens["single_device"])),
        }
        row["time_vs_single_device"] = ratio(values, seconds["single_device"])["ratio"]
        rows.append(row)
        print(
            f"{name:15s} {row['us_per_step']:10.0f} us/step  x{row['time_vs_single_device']:.2f} of single "
            f"device  same tokens: {row['same_tokens_as_single_device']}"
        )
    env = environment()
    out = output_path(args, f"sampler-sharded-{env['device_slug']}-{len(devices)}dev.json")
    write_json(
        out,
        {
            "environment": env,
            "batch": batch,
            "vocab": vocab,
            "steps": args.steps,
            "config": "temperature 0.7, top_k 50, top_p 0.9, min_p 0.05, repetition_penalty 1.1",
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
