"""Shared test setup: strict rank promotion, warnings as errors, a hypothesis profile, fixtures.

Like equinox's test suite, every test runs with implicit rank promotion raising
(`jax_numpy_rank_promotion="raise"`): broadcasting a `[V]` array against `[B, 1]` must be
spelled out.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]

jax.config.update("jax_numpy_rank_promotion", "raise")

# Opt-in persistent compilation cache for local reruns: RTDLM_TEST_JAX_CACHE=DIR (the suite's
# subprocesses inherit it). Off by default: on XLA:CPU (jax 0.10) writing one of the
# speculative loop's executables to the cache aborted the whole pytest process
# (`compilation_cache.put_executable_and_time`, Fatal Python error: Aborted), and a fresh
# CI machine gains nothing from it.
_CACHE_DIR = os.environ.get("RTDLM_TEST_JAX_CACHE", "")
os.environ["RTDLM_NO_COMPILE_CACHE"] = "1"  # the CLI's cache (tests call `main` in-process)
if _CACHE_DIR:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Compiling a JAX function takes seconds on these CPUs: no per-example deadline. Examples
# are derandomised so a CI run is reproducible; `--hypothesis-seed` still works locally.
settings.register_profile("rtdlm", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("rtdlm")


def pytest_configure(config):
    # pyproject.toml already says so; repeat it so running from another rootdir keeps it.
    config.addinivalue_line("filterwarnings", "error")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")


# Every XLA:CPU executable keeps a few memory mappings (its code and data sections) until it
# is freed, and Linux caps a process at vm.max_map_count (65530 by default) mappings. The
# whole suite compiles thousands of programs: before this, the CI process passed the cap a
# third of the way through and XLA segfaulted inside a compile. So compiled programs are
# dropped after every test module, and after any test that leaves the process close to it.
_MAX_MAPS = 30_000


def _memory_map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return maps.read().count(b"\n")
    except OSError:  # not Linux
        return 0


def _drop_compiled_programs() -> None:
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_caches_per_module():
    yield
    _drop_compiled_programs()


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    yield
    if _memory_map_count() > _MAX_MAPS:
        _drop_compiled_programs()


@pytest.fixture
def rng() -> np.random.Generator:
    """A NumPy generator with a fixed seed (each test gets a fresh one)."""
    return np.random.default_rng(20261127)


@pytest.fixture
def key() -> jax.Array:
    """A fixed typed PRNG key."""
    return jax.random.key(0)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
