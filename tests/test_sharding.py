"""Sharded sampling and generation on 8 CPU host devices (in a subprocess: see sharded_checks)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_sharded_sampling_and_generation_match_one_device():
    script = Path(__file__).with_name("sharded_checks.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sharded checks passed" in run.stdout
