"""`generate` and `speculative_generate` tokens/s at this tree against another commit's.

The other commit is checked out in a temporary git worktree; both trees run the same timing
snippet in fresh subprocesses (so each imports its own rtdlm), alternating, and the report
gives each tree's median tokens/s and their ratio. Bundled models, 128 new tokens, balanced
preset (generate) and greedy K=4 (speculative), B=1 and B=16; compile excluded.

    python benchmarks/compare_commits.py --base HEAD~1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import add_output_arguments, environment, output_path, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SNIPPET = r"""
import json, sys, time
import jax, numpy as np
import rtdlm
assert rtdlm.__file__.startswith(sys.argv[3]), (rtdlm.__file__, sys.argv[3])
from rtdlm.decoding import generate, speculative_generate
from rtdlm.models import encode, load_model
from rtdlm.sampling import SamplingConfig, create_sampling_config_balanced

target, draft = load_model("target"), load_model("draft")
new_tokens, calls = int(sys.argv[1]), int(sys.argv[2])
result = {}
for batch in (1, 16):
    prompt = np.tile(encode("import os\n\n\ndef main(argv):\n    ")[None], (batch, 1))
    runs = {
        "generate": lambda: generate(target, prompt, key=jax.random.key(1),
                                     config=create_sampling_config_balanced(), max_new_tokens=new_tokens),
        "speculative": lambda: speculative_generate(target, draft, prompt, key=jax.random.key(1),
                                                    config=SamplingConfig(temperature=0.0),
                                                    max_new_tokens=new_tokens, num_speculative_tokens=4),
    }
    for name, run in runs.items():
        jax.block_until_ready(run().tokens)  # compile
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            jax.block_until_ready(run().tokens)
            seconds.append(time.perf_counter() - start)
        result[f"{name}_b{batch}"] = batch * new_tokens / sorted(seconds)[len(seconds) // 2]
print(json.dumps(result))
"""


def measure(tree: Path, new_tokens: int, calls: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(new_tokens), str(calls), str(tree)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rev_parse(rev: str) -> str:
    out = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the commit to compare with (e.g. HEAD~1)")
    parser.add_argument("--head", default=None, help="the commit to measure (default: this working tree)")
    parser.add_argument("--repeats", type=int, default=3, help="subprocess runs per tree, alternating")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per run (median)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    commits = {name: _rev_parse(rev) for name, rev in (("base", args.base), ("head", args.head)) if rev}
    runs = {"head": [], "base": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"head": REPO}
        for name, commit in commits.items():
            trees[name] = Path(tmp) / name
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(trees[name]), commit],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
        try:
            for repeat in range(args.repeats):
                for name in ("head", "base") if repeat % 2 == 0 else ("base", "head"):
                    runs[name].append(measure(trees[name], args.new_tokens, args.calls))
                    print(
                        f"repeat {repeat} {name}: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in runs[name][-1].items())
                    )
        finally:
            for name in commits:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(trees[name])], cwd=REPO, check=True
                )
    report = {}
    for case in runs["head"][0]:
        head = statistics.median(r[case] for r in runs["head"])
        base = statistics.median(r[case] for r in runs["base"])
        report[case] = {"tokens_per_s": head, "base_tokens_per_s": base, "ratio": head / base}
        print(f"{case}: {head:.0f} tok/s vs base {base:.0f} tok/s -> x{head / base:.3f}")
    env = environment()
    out = output_path(args, f"compare-commits-{env['device_slug']}.json")
    heads = commits.get("head", "working tree")
    write_json(
        out, {"environment": env, "base": commits["base"], "head": heads, "runs": runs, "report": report}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
