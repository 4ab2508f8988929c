"""Every ```python block of README.md runs as pasted.

The blocks run in order in one namespace, with nothing defined beforehand: each block
imports and builds what it uses (a later block may use names an earlier one defined, as a
reader pasting them in order would). The mesh blocks need 8 devices, which must be set up
before JAX starts: they run, in order, in a subprocess with 8 CPU host devices (slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
BLOCKS = [m.group(1) for m in _PYTHON_BLOCK.finditer(README.read_text(encoding="utf-8"))]


def _needs_mesh(block: str) -> bool:
    return "make_mesh" in block


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4
    assert sum(map(_needs_mesh, BLOCKS)) >= 1


def test_readme_blocks_run_in_order(capsys):
    namespace = {"__name__": "readme"}
    for index, block in enumerate(BLOCKS):
        if _needs_mesh(block):
            continue
        exec(compile(block, f"{README}:block-{index}", "exec"), namespace)
    jax.effects_barrier()
    out = capsys.readouterr().out
    assert "class Stack:" in out and "draft tokens accepted: " in out, out
    assert "[0." not in out.split("draft tokens accepted: ")[1], "the acceptance rate prints as a number"


@pytest.mark.slow
def test_readme_mesh_blocks_run_on_8_devices():
    code = "\n".join(
        [
            "import os",
            "os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + "
            "' --xla_force_host_platform_device_count=8'",
            "import jax",
            "jax.config.update('jax_numpy_rank_promotion', 'raise')",
            "namespace = {'__name__': 'readme'}",
            "for block in BLOCKS:",
            "    exec(compile(block, 'README.md:mesh-block', 'exec'), namespace)",
            "assert namespace['out'].tokens.shape == (8, 16)",
            "print('ok')",
        ]
    )
    mesh_blocks = [b for b in BLOCKS if _needs_mesh(b)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"BLOCKS = {mesh_blocks!r}\n{code}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO_ROOT,
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr


# ---- the package's docstring examples ---------------------------------------------------------
def _package_modules() -> list[str]:
    """Every module of the rtdlm package (its docstring examples are run below)."""
    import pkgutil

    import rtdlm

    return sorted(m.name for m in pkgutil.walk_packages(rtdlm.__path__, "rtdlm."))


def _doctest_fixtures() -> dict:
    """Names the docstring examples assume exist (small fakes: the examples run in seconds)."""
    import jax.numpy as jnp

    from rtdlm.decoding.testing import random_markov_model
    from rtdlm.sampling import SamplingConfig, create_sampling_config_balanced

    main_model = random_markov_model(64, seed=0, num_layers=8)
    return {
        "jax": jax,
        "jnp": jnp,
        "logits": jax.random.normal(jax.random.key(1), (64,)) * 2,
        "config": SamplingConfig(temperature=0.7),
        "create_sampling_config_balanced": create_sampling_config_balanced,
        "model": main_model,
        "main_model": main_model,
        "draft_model": random_markov_model(64, seed=1),
        "prompt": jnp.array([[1, 2, 3]], jnp.int32),
        "input_ids": jnp.array([[1, 2, 3, 4]], jnp.int32),
    }


def test_docstring_examples_are_true():
    import doctest
    import importlib

    finder, fixtures = doctest.DocTestFinder(), _doctest_fixtures()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    with_examples = set()
    for name in _package_modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name, extraglobs=fixtures):
            if test.examples and test.filename == module.__file__:  # not re-exported objects
                with_examples.add(name)
                examples += len(test.examples)
                runner.run(test)
    assert {"rtdlm.sampling.sampler", "rtdlm.decoding.loop", "rtdlm.guide"} <= with_examples
    results = runner.summarize(verbose=False)
    assert results.attempted >= 15, (results.attempted, examples)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed (printed above)"
