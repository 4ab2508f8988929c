"""`filters.truncate`: the candidate fast path, the full-vocabulary fallback, ties, -inf/NaN.

`truncate` first computes thresholds on the `num_candidates` largest logits and falls back
to the whole vocabulary (`lax.cond`) when the candidates cannot prove the kept set. Both
paths must give exactly the kept set of the sort-based NumPy reference.

Every call here goes through one jitted `truncate` traced with a spy on the module's
`_keep_rule`: a `jax.debug.callback` that fires only when its code actually runs records the
width of each rule computation, so a test can tell which path a batch took (the candidates'
width only: fast path; the vocabulary's width too: fallback). Shapes are few and fixed
(batch 4; V = 8, 60 or 1000) so the module compiles a handful of programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import reference_process, softmax

from rtdlm.sampling import SamplingConfig, filters, process_logits, truncate

BATCH = 4
SMALL = 8  # hand-made rows are padded with -inf to this width
WIDE = 1000
_widths: list[int] = []


def _spy(values, *args):
    width = values.shape[-1]
    jax.debug.callback(lambda: _widths.append(width))
    return _ORIGINAL_KEEP_RULE(values, *args)


_ORIGINAL_KEEP_RULE = filters._keep_rule


def _truncate_traced_with_spy(logits, top_k, top_p, min_p, typical_p, greedy, num_candidates):
    with pytest.MonkeyPatch.context() as patch:  # only while tracing: the callback is baked in
        patch.setattr(filters, "_keep_rule", _spy)
        return truncate(logits, top_k, top_p, min_p, typical_p, greedy, num_candidates=num_candidates)


_spied_jit = jax.jit(_truncate_traced_with_spy, static_argnames="num_candidates")


def run(logits, num_candidates=128, *, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, greedy=False):
    """truncate([B, V] logits, per-row or scalar params) -> (out [B, V], widths of the rules run)."""
    logits = jnp.asarray(logits, jnp.float32)
    batch = logits.shape[0]

    def per_row(value, dtype):
        return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))

    _widths.clear()
    out = _spied_jit(
        logits,
        per_row(top_k, jnp.int32),
        per_row(top_p, jnp.float32),
        per_row(min_p, jnp.float32),
        per_row(typical_p, jnp.float32),
        per_row(greedy, jnp.bool_),
        num_candidates=num_candidates,
    )
    out = np.asarray(out)
    jax.effects_barrier()
    return out, list(_widths)


def run_rows(rows, num_candidates=SMALL, **params):
    """Hand-made rows (each up to SMALL long): padded with -inf to [BATCH, SMALL]; returns the
    kept mask of the given rows, cut back to their lengths."""
    padded = np.full((BATCH, SMALL), -np.inf, np.float32)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = row
    out, _ = run(padded, num_candidates, **params)
    return [np.isfinite(out[b, : len(row)]).astype(int).tolist() for b, row in enumerate(rows)]


def reference(logits, *, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, greedy=False):
    return reference_process(
        np.asarray(logits, np.float32),
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        do_sample=np.logical_not(greedy),
    )


def assert_same_kept_set(out, ref, *, check_margin=True):
    out = np.atleast_2d(out)
    ref_logits = np.atleast_2d(ref.logits)
    for b in range(out.shape[0]):
        if check_margin and np.atleast_1d(ref.margin)[b] < 1e-5:
            continue  # a decision within float32 rounding of its boundary
        np.testing.assert_array_equal(
            np.isfinite(out[b]),
            np.isfinite(ref_logits[b]),
            err_msg=f"row {b}: kept {np.flatnonzero(np.isfinite(out[b]))[:30]} "
            f"vs reference {np.flatnonzero(np.isfinite(ref_logits[b]))[:30]}",
        )
        np.testing.assert_allclose(softmax(out[b]), softmax(ref_logits[b]), rtol=0, atol=1e-5)


def wide_rows(scales, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(len(scales), WIDE)) * np.asarray(scales)[:, None]).astype(np.float32)


# ---- which path runs ------------------------------------------------------------------------
def test_fast_path_is_taken_and_exact():
    # per row: peaked top-p; top-k + top-p; min-p; top-k + typical-p: all inside 128 candidates
    logits = wide_rows([4.0, 1.0, 3.0, 4.0], seed=1)
    params = dict(
        top_k=[0, 20, 0, 50],
        top_p=[0.9, 0.8, 1.0, 1.0],
        min_p=[0.0, 0.0, 0.05, 0.0],
        typical_p=[1.0, 1.0, 1.0, 0.7],
    )
    out, widths = run(logits, 128, **params)
    assert widths == [128], widths  # the candidates' rule only: no full-vocabulary pass
    assert_same_kept_set(out, reference(logits, **params))


def test_no_filter_in_the_batch_skips_the_threshold_search():
    logits = wide_rows([4.0, 1.0, 0.1, 2.0], seed=3)
    out, widths = run(logits, 128)  # every filter off
    assert widths == [], widths  # no rule computed at all
    np.testing.assert_array_equal(out, logits)
    out, widths = run(logits, 128, top_k=[0, 0, 7, 0])  # one filtering row: the search runs
    assert widths == [128], widths
    assert_same_kept_set(out, reference(logits, top_k=[0, 0, 7, 0]))


FALLBACK_CASES = [
    # (name, logit scales per row, params, num_candidates)
    (
        "flat logits: the nucleus exceeds the candidates (one row forces the batch)",
        [0.1, 4.0, 4.0, 2.0],
        dict(top_p=0.9),
        128,
    ),
    ("top-k larger than the candidates", [1.0] * 4, dict(top_k=[10, 3, 2, 1]), 4),
    ("tiny candidate set, top-p", [1.0] * 4, dict(top_p=[0.95, 0.5, 0.3, 0.1]), 4),
    ("typical band outside the candidates", [0.5] * 4, dict(typical_p=[0.5, 0.3, 0.9, 0.99]), 16),
]


@pytest.mark.parametrize(
    ("name", "scales", "params", "num_candidates"), FALLBACK_CASES, ids=[case[0] for case in FALLBACK_CASES]
)
def test_fallback_is_taken_and_exact(name, scales, params, num_candidates):
    logits = wide_rows(scales, seed=len(name))
    out, widths = run(logits, num_candidates, **params)
    # C candidates (or C/2, where the nucleus provably exceeds C), then the whole row; no
    # search at all where every row's top-p nucleus provably exceeds C (top-p alone)
    if name == "tiny candidate set, top-p":
        assert widths == [WIDE], widths
    else:
        assert widths[-1] == WIDE and widths[-2] in (num_candidates, num_candidates // 2), widths
    assert_same_kept_set(out, reference(logits, **params))


def test_a_nucleus_wider_than_the_candidates_skips_the_search():
    # Flat rows: 90% of the mass is far more than C = 8 logits can hold (at most the count
    # within 1 of the max, the rest below 1/e each): no candidate search, straight to the row.
    logits = wide_rows([0.5] * 4, seed=11)
    out, widths = run(logits, 8, top_p=0.9)
    assert widths == [WIDE], widths
    assert_same_kept_set(out, reference(logits, top_p=0.9))
    # A peaked row (one token holds ~95% of the mass): the target is below C/e, so the
    # count cannot show a wide nucleus; the C/2 = 4 candidates hold it.
    logits = wide_rows([0.5] * 4, seed=12) - 10.0
    logits[:, 0] = 0.0
    out, widths = run(logits, 8, top_p=0.9)
    assert widths == [4], widths
    assert_same_kept_set(out, reference(logits, top_p=0.9))
    # A nucleus of about 6 tokens: C = 8 may hold it, so the wider tier is still tried.
    logits = np.full((4, WIDE), -30.0, np.float32)
    logits[:, :6] = 0.0
    out, widths = run(logits, 8, top_p=0.99)
    assert widths == [4, 8], widths
    assert_same_kept_set(out, reference(logits, top_p=0.99))


def test_the_narrow_candidate_set_comes_first_on_wide_rows():
    # 1000 logits = 63 blocks of 16 >= 4 C for C = 8: the C/2 = 4 candidates are tried first.
    logits = wide_rows([3.0] * 4, seed=5)
    out, widths = run(logits, 8, top_k=3)
    assert widths == [4], widths  # top-3 is proven by 4 candidates: no wider search
    assert_same_kept_set(out, reference(logits, top_k=3))
    out, widths = run(logits, 8, top_k=[3, 6, 1, 2])  # one row needs more than 4
    assert widths == [4, 8], widths
    assert_same_kept_set(out, reference(logits, top_k=[3, 6, 1, 2]))


def test_ties_straddling_the_last_candidate():
    # 20 tokens tied at the 4th-largest value: the 16 candidates hold 13 of them.
    logits = np.full((BATCH, WIDE), -5.0, np.float32)
    logits[:, :3] = [3.0, 2.0, 1.0]
    logits[:, 3:23] = 0.5
    # Top-k alone: the 5th value is the tie's value whichever ties are candidates, so the
    # fast path is exact (it keeps all 20 ties, applying its threshold to the whole row).
    out, widths = run(logits, 16, top_k=5)
    assert widths == [16], widths
    for row in out:  # top 3 + all 20 ties with the 5th value
        np.testing.assert_array_equal(np.flatnonzero(np.isfinite(row)), np.arange(23))
    # Top-k then top-p: the top-k renormaliser needs the 7 ties outside the candidates.
    out, widths = run(logits, 16, top_k=5, top_p=0.99)
    assert WIDE in widths, widths
    assert_same_kept_set(out, reference(logits, top_k=5, top_p=0.99))
    # Typical-p whose kept set reaches the tie: its entropy needs all of them.
    out, widths = run(logits, 16, min_p=np.exp(0.5 - 3.0) * 0.99, typical_p=0.99)
    assert WIDE in widths, widths
    assert_same_kept_set(out, reference(logits, min_p=np.exp(0.5 - 3.0) * 0.99, typical_p=0.99))


def test_rows_with_few_finite_logits_stay_on_the_fast_path():
    logits = np.full((BATCH, WIDE), -np.inf, np.float32)
    logits[:, :3] = [[1.0, 0.5, 0.0], [2.0, -1.0, 0.3], [0.0, 0.0, 0.0], [5.0, 4.0, -3.0]]
    out, widths = run(logits, 16, top_p=0.99, typical_p=0.999)
    assert widths == [16], widths
    assert_same_kept_set(out, reference(logits, top_p=0.99, typical_p=0.999))


# ---- fast path == fallback == reference, many random configs -------------------------------
def test_fast_path_and_fallback_give_identical_kept_sets():
    rng = np.random.default_rng(1000)
    paths = set()
    for trial in range(8):
        if trial % 2:  # anything goes: mostly fallback at some candidate count
            scale = [0.1, 0.5, 1.0, 3.0][trial // 2]
            top_k = np.where(rng.random(BATCH) < 0.5, rng.integers(1, 300, BATCH), 0)
            top_p = np.where(rng.random(BATCH) < 0.7, rng.uniform(0.05, 1.0, BATCH), 1.0)
            typical_p = np.where(rng.random(BATCH) < 0.4, rng.uniform(0.2, 1, BATCH), 1.0)
        else:  # peaked rows with small kept sets: the fast path at 128 candidates
            scale = 4.0
            top_k = np.where(rng.random(BATCH) < 0.5, rng.integers(1, 100, BATCH), 0)
            top_p = rng.uniform(0.05, 0.9, BATCH)
            typical_p = np.ones(BATCH)
        logits = (rng.normal(size=(BATCH, WIDE)) * scale).astype(np.float32)
        params = dict(
            top_k=top_k.astype(np.int32),
            top_p=top_p.astype(np.float32),
            typical_p=typical_p.astype(np.float32),
            min_p=np.where(rng.random(BATCH) < 0.4, rng.uniform(0, 0.2, BATCH), 0.0).astype(np.float32),
            greedy=rng.random(BATCH) < 0.15,
        )
        full, widths = run(logits, WIDE, **params)  # no candidates at all
        assert widths == [WIDE]
        for candidates in (4, 16, 128):
            out, widths = run(logits, candidates, **params)
            paths.add("fallback" if WIDE in widths else "fast")
            np.testing.assert_array_equal(out, full)  # same kept set, same values
        assert_same_kept_set(full, reference(logits, **params))
    assert paths == {"fast", "fallback"}  # both paths were exercised


def test_process_logits_with_a_small_candidate_set():
    """The config's static `num_candidates` reaches `truncate`; a tiny one is still exact."""
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(BATCH, WIDE)) * np.array([[0.2], [1.0], [3.0], [2.0]])).astype(np.float32)
    params = dict(
        temperature=[0.8, 1.0, 1.3, 0.5],
        top_k=[0, 300, 40, 0],
        top_p=[0.9, 0.95, 0.5, 1.0],
        min_p=[0.0, 0.01, 0.02, 0.1],
    )
    out = jax.jit(process_logits)(jnp.asarray(logits), SamplingConfig(**params, num_candidates=4))
    assert_same_kept_set(np.asarray(out), reference_process(logits, **params))


# ---- the tie rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_candidates", [4, 16, 60])
def test_ties_on_integer_logits_with_banned_tokens(num_candidates):
    """Deliberate ties (integer logits) and -inf entries: ties with the k-th value and with the
    top-p / typical-p crossing are all kept, on both paths, exactly as in the reference."""
    rng = np.random.default_rng(7)
    vocab = 60
    for _ in range(12):
        logits = rng.integers(-4, 4, size=(BATCH, vocab)).astype(np.float32)
        logits[rng.random((BATCH, vocab)) < 0.2] = -np.inf
        params = dict(
            top_k=rng.integers(0, 30, BATCH).astype(np.int32),
            top_p=rng.uniform(0.1, 1.0, BATCH).astype(np.float32),
            min_p=np.where(rng.random(BATCH) < 0.3, rng.uniform(0, 0.5, BATCH), 0).astype(np.float32),
            typical_p=np.where(rng.random(BATCH) < 0.3, rng.uniform(0.2, 1.0, BATCH), 1).astype(np.float32),
        )
        out, _ = run(logits, num_candidates, **params)
        assert_same_kept_set(out, reference(logits, **params), check_margin=False)


@pytest.mark.parametrize("num_candidates", [2, SMALL])
def test_top_k_keeps_every_tie_with_the_kth_value(num_candidates):
    row = [5.0, 3.0, 3.0, 3.0, 1.0, -np.inf, 0.0]
    assert run_rows([row], num_candidates, top_k=2) == [[1, 1, 1, 1, 0, 0, 0]]
    assert run_rows([row], num_candidates, top_k=1) == [[1, 0, 0, 0, 0, 0, 0]]
    assert run_rows([row], num_candidates, top_k=4) == [[1, 1, 1, 1, 0, 0, 0]]
    assert run_rows([row], num_candidates, top_k=5) == [[1, 1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("num_candidates", [2, SMALL])
def test_top_p_keeps_the_crossing_token_and_its_ties(num_candidates):
    row = np.log([0.4, 0.2, 0.2, 0.1, 0.1])
    # 0.4 < 0.5 -> crossing at the first 0.2; its tie (the other 0.2) is kept too
    assert run_rows([row], num_candidates, top_p=0.5) == [[1, 1, 1, 0, 0]]
    # 0.3 is reached by the first token alone: the crossing token is included, nothing else
    assert run_rows([row], num_candidates, top_p=0.3) == [[1, 0, 0, 0, 0]]
    # a tiny top_p keeps the most probable token (never an empty set)
    assert run_rows([row], num_candidates, top_p=1e-6) == [[1, 0, 0, 0, 0]]


def test_top_p_runs_on_the_top_k_renormalised_distribution():
    row = np.log([0.3, 0.25, 0.2, 0.15, 0.1])
    # top-k 2 renormalises to [0.545, 0.455]: top_p 0.5 then keeps only the first token,
    # while on the raw distribution it would keep two.
    assert run_rows([row], top_k=2, top_p=0.5) == [[1, 0, 0, 0, 0]]
    assert run_rows([row], top_p=0.5) == [[1, 1, 0, 0, 0]]


def test_min_p_is_relative_to_the_top_token():
    row = np.log([0.5, 0.2, 0.1, 0.04, 0.16])
    # threshold 0.3 * 0.5 = 0.15: keeps 0.5, 0.2, 0.16
    assert run_rows([row], min_p=0.3) == [[1, 1, 0, 0, 1]]
    assert run_rows([row], min_p=1.0) == [[1, 0, 0, 0, 0]]


def test_typical_p_by_hand():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    entropy = -np.sum(probs * np.log(probs))  # 1.2756
    distance = np.abs(-np.log(probs) - entropy)  # closest first: 0.3, 0.5, 0.1, 0.06, 0.04
    np.testing.assert_array_equal(np.argsort(distance)[:3], [1, 0, 2])
    row = np.log(probs)
    assert run_rows([row], typical_p=0.25) == [[0, 1, 0, 0, 0]]
    assert run_rows([row], typical_p=0.5) == [[1, 1, 0, 0, 0]]
    assert run_rows([row], typical_p=0.85) == [[1, 1, 1, 0, 0]]


def test_top_k_of_vocab_size_or_more_is_off():
    logits = np.random.default_rng(0).normal(size=(BATCH, SMALL)).astype(np.float32)
    for k in (SMALL, SMALL + 1, 10**6):
        out, _ = run(logits, top_k=k)
        np.testing.assert_array_equal(out, logits)


# ---- degenerate inputs ----------------------------------------------------------------------
DEGENERATE = np.array(
    [
        [-np.inf] * SMALL,  # nothing finite: uniform
        [np.nan] * SMALL,  # all NaN: uniform
        [1.0, np.nan, 2.0, np.nan, 0.5, -np.inf, -np.inf, -np.inf],  # NaN counts as removed
        [1.0, np.inf, 2.0, np.inf, 0.5, -1.0, -np.inf, -np.inf],  # +inf: the +inf tokens share the mass
    ],
    np.float32,
)


@pytest.mark.parametrize("num_candidates", [2, SMALL])
def test_degenerate_rows(num_candidates):
    out, _ = run(DEGENERATE, num_candidates)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0], np.zeros(SMALL))
    np.testing.assert_array_equal(out[1], np.zeros(SMALL))
    np.testing.assert_array_equal(np.isfinite(out[2]), [1, 0, 1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(softmax(out[3]), [0, 0.5, 0, 0.5, 0, 0, 0, 0], atol=1e-12)
    # greedy: token 0 for an empty row, the first maximum otherwise
    greedy, _ = run(DEGENERATE, num_candidates, greedy=True)
    assert [int(np.flatnonzero(np.isfinite(row))[0]) for row in greedy] == [0, 0, 2, 1]
    assert (np.isfinite(greedy).sum(axis=1) == 1).all()


def test_degenerate_rows_with_filters():
    out, _ = run(DEGENERATE, top_k=2, top_p=0.3, min_p=0.5, typical_p=0.5)
    assert not np.isnan(out).any()
    for row in out:
        probs = softmax(row)
        assert not np.isnan(probs).any() and probs.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(out[3])), [1, 3])


def test_out_of_range_traced_values_are_clamped():
    """Values that cannot be validated (traced) follow the documented clamping."""
    row = np.log([0.4, 0.3, 0.2, 0.1])
    assert run_rows([row], top_p=0.0) == [[1, 0, 0, 0]]  # clipped to the smallest positive
    assert run_rows([row], top_p=1.5) == [[1, 1, 1, 1]]
    assert run_rows([row], top_p=np.nan) == [[1, 1, 1, 1]]  # NaN: off
    assert run_rows([row], min_p=2.0) == [[1, 0, 0, 0]]  # clipped to 1
    assert run_rows([row], min_p=-1.0) == [[1, 1, 1, 1]]
    assert run_rows([row], top_k=-3) == [[1, 1, 1, 1]]  # <= 0: off
    assert run_rows([row], typical_p=0.0) == run_rows([row], typical_p=1e-30)


def test_order_key_is_monotonic():
    # (no subnormals: XLA on CPU may flush them to zero)
    values = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38, np.inf], np.float32)
    keys = np.asarray(jax.jit(filters.order_key)(jnp.asarray(values))).astype(np.int64)
    assert (np.diff(keys) >= 0).all()
    assert (np.diff(np.delete(keys, 4)) > 0).all()


def test_signed_zeros_are_ties_under_jit():
    keys = np.asarray(jax.jit(filters.order_key)(jnp.array([-0.0, 0.0], jnp.float32)))
    assert keys[0] == keys[1]
    # -0.0 == 0.0: top_k=1 must keep all three zeros (ties with the k-th value)
    assert run_rows([[-0.0, 0.0, -1.0, -0.0]], top_k=1) == [[1, 1, 0, 1]]


# ---- low-precision-valued logits: ties at the last candidate (issue 12) ---------------------
def as_bf16_values(x):
    """float32 array whose values are bfloat16-rounded (what a bf16 model's logits hold)."""
    return np.array(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def outside_ties(logits, num_candidates):
    """[B] how many tokens outside the candidates tie with the last candidate's value."""
    last = -np.sort(-logits, axis=-1)[:, num_candidates - 1]
    return (logits >= last[:, None]).sum(axis=-1) - num_candidates


def per_row(value, dtype, batch):
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


@jax.jit
def full_rule_keep(logits, top_k, top_p, min_p, typical_p):
    """The full-vocabulary rule's kept set (no candidates)."""
    greedy = jnp.zeros(logits.shape[0], bool)
    return jnp.isfinite(
        truncate(logits, top_k, top_p, min_p, typical_p, greedy, num_candidates=logits.shape[-1])
    )


candidate_keep = jax.jit(filters._candidate_keep, static_argnames="num_candidates")


def candidates_vs_full(logits, num_candidates, *, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0):
    """(kept by the candidates alone [B, V], covered [B], kept by the full rule [B, V])."""
    batch = logits.shape[0]
    params = (
        per_row(top_k, jnp.int32, batch),
        per_row(top_p, jnp.float32, batch),
        per_row(min_p, jnp.float32, batch),
        per_row(typical_p, jnp.float32, batch),
    )
    keep, covered = candidate_keep(jnp.asarray(logits), *params, num_candidates=num_candidates)
    keep = np.asarray(keep) & (np.asarray(logits, np.float32) > -np.inf)  # as truncate removes -inf
    return keep, np.asarray(covered), np.asarray(full_rule_keep(jnp.asarray(logits), *params))


BALANCED_ROWS = dict(  # the balanced preset's filters, and each filter alone
    top_k=[50, 0, 0, 100],
    top_p=[0.9, 0.8, 1.0, 1.0],
    min_p=[0.0, 0.0, 0.05, 0.0],
)


@pytest.mark.parametrize("rounding", ["bfloat16", "float16"])
def test_low_precision_valued_logits_take_the_fast_path(rounding):
    rng = np.random.default_rng(12)
    logits = (rng.normal(size=(BATCH, WIDE)) * np.array([[2.0], [4.0], [3.0], [1.5]])).astype(np.float32)
    logits = np.array(jnp.asarray(logits, rounding).astype(jnp.float32))
    logits[:, 0] = np.max(logits, axis=-1)  # ties at the top too
    if rounding == "bfloat16":  # (float16's 10 mantissa bits rarely tie at V=1000)
        assert (outside_ties(logits, 128) > 0).sum() >= 2  # the old condition fell back on these
    out, widths = run(logits, 128, **BALANCED_ROWS)
    assert widths == [128], widths  # candidates only: no full-vocabulary pass
    full, _ = run(logits, WIDE, **BALANCED_ROWS)
    np.testing.assert_array_equal(out, full)
    assert_same_kept_set(out, reference(logits, **BALANCED_ROWS), check_margin=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_arrays_match_their_float32_values(dtype):
    rng = np.random.default_rng(13)
    logits = jnp.asarray(rng.normal(size=(BATCH, WIDE)) * 3.0, dtype)
    dtypes = (jnp.int32, jnp.float32, jnp.float32)
    params = [per_row(v, d, BATCH) for v, d in zip(BALANCED_ROWS.values(), dtypes, strict=True)]
    typical = per_row(1.0, jnp.float32, BATCH)
    _, covered = candidate_keep(logits, *params, typical, num_candidates=128)
    assert np.asarray(covered).all()
    greedy = jnp.zeros(BATCH, bool)
    got = jax.jit(truncate)(logits, *params, typical, greedy)
    want = jax.jit(truncate)(logits.astype(jnp.float32), *params, typical, greedy)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_same_kept_set(np.asarray(got), reference(np.asarray(logits, np.float32), **BALANCED_ROWS))


def test_adversarial_ties_at_the_last_candidate():
    # 16 candidates; a tie group of 20 tokens at 0.5 whose first 13 are candidates, so 3
    # candidates lie strictly above `last` and 7 ties lie outside.
    logits = np.full((8, WIDE), -5.0, np.float32)
    logits[:, :3] = [3.0, 2.0, 1.0]
    logits[:, 3:23] = 0.5
    mass = np.exp(np.array([3.0, 2.0, 1.0] + [0.5] * 20 + [-5.0] * (WIDE - 23)))
    first_three = mass[:3].sum() / mass.sum()
    # After top-k 5 (all 23 kept) a top-p between these keeps all 23 on the full row, but
    # only 2 tokens on the candidates' mass (which misses 7 ties).
    m3, tie = mass[:3].sum(), mass[3]
    p_between = (m3 / (m3 + 20 * tie) + m3 / (m3 + 13 * tie)) / 2
    cases = [  # (params, covered): why
        (dict(top_k=3, top_p=0.99), True),  # k-th value above `last`: no tie involved
        (dict(top_k=5), True),  # the k-th value is `last` whichever ties are candidates
        (dict(top_k=5, top_p=p_between), False),  # top-p's renormaliser needs the outside ties
        (dict(top_p=first_three * 0.999), True),  # crossing above `last`
        (dict(top_p=first_three * 1.01), True),  # crossing at `last`: all 20 ties kept
        (dict(top_p=0.999), False),  # crossing beyond the candidates
        (dict(min_p=0.01), True),  # min-p's threshold needs only the row's maximum
        (dict(top_k=3, typical_p=0.9), True),  # typical-p over a kept set above `last`
    ]
    rows = [params for params, _ in cases]
    params = {
        name: [row.get(name, default) for row in rows]
        for name, default in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0))
    }
    keep, covered, full = candidates_vs_full(logits, 16, **params)
    np.testing.assert_array_equal(covered, [want for _, want in cases])
    np.testing.assert_array_equal(keep[covered], full[covered])
    ref = reference(logits, **params)
    np.testing.assert_array_equal(full, ref.kept())
    assert full[2].sum() == 23 and keep[2].sum() == 2  # the uncovered row needed the fallback


@pytest.mark.parametrize("num_candidates", [4, 16, 40])
def test_covered_rows_keep_exactly_the_full_rule_under_heavy_ties(num_candidates):
    """Soundness of the condition: on rows with few distinct values (ties everywhere, at
    the last candidate in particular), wherever a row is covered the candidates' kept set
    is the full rule's."""
    rng = np.random.default_rng(num_candidates)
    batch, vocab = 512, 64
    levels = rng.integers(3, 12, size=(batch, 1))
    logits = (rng.integers(0, 1000, size=(batch, vocab)) % levels).astype(np.float32) * 0.5
    logits[rng.random((batch, vocab)) < 0.1] = -np.inf
    logits = as_bf16_values(logits * rng.uniform(0.5, 3.0, size=(batch, 1)))
    near_c = num_candidates + rng.integers(-6, 3, size=batch)
    params = dict(
        top_k=np.where(rng.random(batch) < 0.6, np.clip(near_c, 0, vocab), 0),
        top_p=np.where(rng.random(batch) < 0.6, rng.uniform(0.05, 1.0, batch), 1.0),
        min_p=np.where(rng.random(batch) < 0.3, rng.uniform(0.0, 0.5, batch), 0.0),
        typical_p=np.where(rng.random(batch) < 0.3, rng.uniform(0.2, 1.0, batch), 1.0),
    )
    keep, covered, full = candidates_vs_full(logits, num_candidates, **params)
    assert 0.1 < covered.mean() < 0.95, covered.mean()  # both outcomes exercised
    mismatched = np.flatnonzero(covered & (keep != full).any(axis=-1))
    assert mismatched.size == 0, mismatched
    assert (outside_ties(np.where(np.isnan(logits), -np.inf, logits), num_candidates)[covered] > 0).any()
    ref = reference(logits, **params)
    np.testing.assert_array_equal(full, ref.kept())
