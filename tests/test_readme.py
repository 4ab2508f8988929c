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
