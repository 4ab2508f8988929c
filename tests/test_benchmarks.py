"""Smoke tests: each benchmark script runs end to end in its --quick mode and writes the
JSON fields the README and notes quote. (They time nothing that is asserted: performance
is shown by the benchmarks themselves, on a quiet machine.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_benchmark(repo_root, script, *args):
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_sampler_benchmark(repo_root, tmp_path):
    out = tmp_path / "sampler.json"
    run_benchmark(repo_root, "sampler.py", "--out", str(out))
    payload = json.loads(out.read_text())
    assert payload["quick"] and payload["jax_version"] and payload["results"]
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_decode_benchmark(repo_root, tmp_path):
    out = tmp_path / "decode.json"
    run_benchmark(repo_root, "decode.py", "--out", str(out))
    payload = json.loads(out.read_text())
    assert payload["generate_vs_python_loop"] and payload["sampling_overhead"]["lm_like_logits"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--self"]], ids=["draft-model", "self-speculative"])
def test_speculative_benchmark(repo_root, tmp_path, extra):
    out = tmp_path / "speculative.json"
    run_benchmark(repo_root, "speculative.py", *extra, "--ks", "2", "--modes", "greedy", "--out", str(out))
    payload = json.loads(out.read_text())
    assert "partial" not in payload and payload["rows"]
    for row in payload["rows"]:
        assert row["K"] == 2 and row["mode"] == "greedy"
        assert row["speedup"] > 0 and 0 <= row["alpha"] <= 1 and row["verify_cost"] > 0
        bound = (row["K"] * row["c"] + 1) / (row["K"] * row["c"] + row["verify_cost"])
        assert row["fraction_of_ideal_bound_at_measured_v"] == pytest.approx(bound)
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_prompt_lookup_benchmark(repo_root, tmp_path):
    out = tmp_path / "lookup.json"
    run_benchmark(repo_root, "speculative.py", "--lookup", "--ks", "2", "--out", str(out))
    payload = json.loads(out.read_text())
    assert {(row["prompts"], row["batch"]) for row in payload["rows"]} == {
        (prompts, batch) for prompts in ("copy", "ordinary") for batch in (1, 2)
    }
    for row in payload["rows"]:
        # timings of a tiny contended run: signs and finiteness only, never speed
        assert row["speedup"] > 0 and row["prefill_fraction_of_generate"] > 0
        assert row["decode_speedup"] is None or row["decode_speedup"] > 0
        assert row["same_tokens_as_generate"]  # greedy lookup is generate, token for token
    assert out.with_suffix(".png").exists()


def test_results_go_to_runs_unless_saved_explicitly(repo_root):
    """A plain benchmark run never overwrites the committed benchmarks/results/."""
    import argparse

    from benchmarks._timing import add_output_arguments, output_path

    parser = argparse.ArgumentParser()
    add_output_arguments(parser)
    default = output_path(parser.parse_args([]), "sampler-cpu.json")
    assert default == repo_root / "runs" / "benchmarks" / "sampler-cpu.json"
    saved = output_path(parser.parse_args(["--save-results"]), "sampler-cpu.json")
    assert saved == repo_root / "benchmarks" / "results" / "sampler-cpu.json"
    assert output_path(parser.parse_args(["--out", "x/y.json"]), "sampler-cpu.json").as_posix() == "x/y.json"
    for script in ("sampler.py", "decode.py", "speculative.py", "sharded_sampler.py"):
        source = (repo_root / "benchmarks" / script).read_text()
        assert "output_path(args," in source and '"benchmarks/results/' not in source, script


@pytest.mark.slow
def test_vs_transformers_benchmark(repo_root, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "vs-transformers.json"
    run_benchmark(repo_root, "vs_transformers.py", "--out", str(out))
    payload = json.loads(out.read_text())
    differences = payload["max_abs_logit_difference"]
    assert max(differences["target"], differences["draft"]) <= 1e-4 and differences["target_windowed"] <= 1e-3
    assert {(row["batch"], row["mode"]) for row in payload["generate"]} == {
        (b, m) for b in (1, 2) for m in ("greedy", "sampling")
    }
    for row in payload["generate"]:
        assert row["rtdlm_over_transformers_dynamic"]["ratio"] > 0
        assert row["rtdlm_over_transformers_static"]["ratio"] > 0
    assert payload["speculative"][0]["rtdlm_speculative_over_transformers_assisted"]["ratio"] > 0
    assert payload["speculative"][1]["batch"] == 2
    lookup = payload["prompt_lookup"]
    assert [row["batch"] for row in lookup] == [1, 2]
    assert lookup[0]["rtdlm_lookup_over_transformers_lookup"]["ratio"] > 0
