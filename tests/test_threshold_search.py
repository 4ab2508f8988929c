"""The two exact threshold searches (all pairs, radix select) agree with a sort reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.sampling.filters import _pairwise_threshold, _radix_select, order_key


def _reference(keys, weights, target):
    """Largest key t with sum(weights[keys >= t]) >= target, by sorting (NumPy)."""
    out = []
    for k, w, goal in zip(keys, weights, target, strict=True):
        order = np.argsort(-k.astype(np.int64), kind="stable")
        mass = np.cumsum(w[order].astype(np.float64))
        out.append(k[order][np.argmax(mass >= goal)])
    return np.array(out)


def test_order_key_is_monotone():
    x = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, 3e38, np.inf], np.float32)
    keys = np.asarray(order_key(jnp.asarray(x))).astype(np.int64)
    assert np.all(np.diff(keys) >= 0) and keys[4] == keys[5]  # -0.0 == +0.0


@pytest.mark.parametrize("search", [_pairwise_threshold, _radix_select])
@pytest.mark.parametrize("kind", ["mass", "count", "ties", "masked"])
def test_threshold_search_matches_sort_reference(search, kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    x = rng.normal(size=(6, 900)).astype(np.float32) * 3
    if kind == "ties":
        x = np.round(x)
    if kind == "masked":
        x[:, ::3] = -np.inf
    weights = np.ones_like(x) if kind == "count" else np.exp(x - x.max(1, keepdims=True))
    target = rng.uniform(0.01, 0.99, size=6).astype(np.float32) * weights.sum(1)
    keys = np.asarray(order_key(jnp.asarray(x)))
    got = jax.jit(search)(jnp.asarray(keys), jnp.asarray(weights), jnp.asarray(target))
    np.testing.assert_array_equal(np.asarray(got), _reference(keys, weights, target))
