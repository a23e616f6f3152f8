from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest

import sbssl.stats as stats
from sbssl.stats import (
    adjust_p_values,
    association_test,
    association_test_from_similarity,
    effect_size_ci,
    effect_size_ci_from_similarity,
)


def _sets(seed: int, n_x: int = 6, n_y: int = 6, n_a: int = 5, n_b: int = 7, dim: int = 16, shift: float = 0.0):
    """Random target/attribute embeddings; ``shift`` pulls X towards A and Y towards B (a real effect)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n_a, dim)), rng.normal(size=(n_b, dim))
    x = rng.normal(size=(n_x, dim)) + shift * a.mean(axis=0)
    y = rng.normal(size=(n_y, dim)) + shift * b.mean(axis=0)
    return x, y, a, b


def _cos(u, v) -> float:
    return sum(p * q for p, q in zip(u, v)) / math.sqrt(sum(p * p for p in u) * sum(q * q for q in v))


def _naive(X, Y, A, B):
    """Textbook WEAT with plain Python loops: (s values of X then Y, statistic, d, exact p_greater, p_less)."""
    s = [sum(_cos(w, a) for a in A) / len(A) - sum(_cos(w, b) for b in B) / len(B) for w in list(X) + list(Y)]
    n_x = len(X)
    stat = sum(s[:n_x]) - sum(s[n_x:])
    mean = sum(s) / len(s)
    sd = math.sqrt(sum((v - mean) ** 2 for v in s) / (len(s) - 1))
    d = (sum(s[:n_x]) / n_x - sum(s[n_x:]) / len(Y)) / sd
    observed = sum(s[:n_x])
    sums = [sum(s[i] for i in c) for c in itertools.combinations(range(len(s)), n_x)]
    greater = sum(v >= observed for v in sums) / len(sums)
    less = sum(v <= observed for v in sums) / len(sums)
    return s, stat, d, greater, less


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("sizes", [(6, 6, 5, 7), (4, 7, 3, 2), (1, 1, 1, 1), (3, 9, 6, 6)])
def test_statistic_effect_size_and_exact_p_match_naive_implementation(sizes):
    X, Y, A, B = _sets(1, *sizes)
    _, stat, d, greater, less = _naive(X, Y, A, B)
    res = association_test(X, Y, A, B)
    assert res.exact
    assert res.n_permutations == math.comb(sizes[0] + sizes[1], sizes[0])
    assert res.statistic == pytest.approx(stat, abs=1e-12)
    assert res.effect_size == pytest.approx(d, abs=1e-12)
    assert res.p_value == greater
    assert association_test(X, Y, A, B, alternative="less").p_value == less
    assert (res.n_x, res.n_y, res.n_a, res.n_b) == sizes
    assert res.alternative == "greater"


def test_result_dataclass_is_frozen_and_as_dict_has_every_field():
    res = association_test(*_sets(2))
    with pytest.raises(AttributeError):
        res.p_value = 0.0  # type: ignore[misc]
    assert list(res.as_dict()) == [
        "statistic", "effect_size", "p_value", "n_permutations", "exact", "p_floor", "alternative",
        "n_x", "n_y", "n_a", "n_b",
    ]  # fmt: skip


def test_strong_effect_gives_smallest_attainable_p():
    res = association_test(*_sets(3, shift=4.0))
    assert res.effect_size > 1.5
    assert res.p_value == res.p_floor == 1 / 924
    assert association_test(*_sets(3, shift=4.0), alternative="less").p_value == 1.0


def test_cosine_is_scale_invariant_and_computed_in_float64():
    X, Y, A, B = _sets(4)
    ref = association_test(X, Y, A, B)
    scaled = association_test(X * 3.0, Y * np.arange(1, 7)[:, None], A * 1e-3, B * 7.0)
    assert scaled.effect_size == pytest.approx(ref.effect_size, abs=1e-12)
    assert scaled.p_value == ref.p_value
    huge = association_test(X * 1e300, Y * 1e-290, A * 1e200, B * 1e-280)  # norms would overflow or underflow
    assert huge.effect_size == pytest.approx(ref.effect_size, abs=1e-12)
    assert huge.p_value == ref.p_value
    as32 = [m.astype(np.float32) for m in (X, Y, A, B)]
    from64 = association_test(*[m.astype(np.float64) for m in as32])
    assert association_test(*as32).as_dict() == from64.as_dict()


def test_similarity_variant_matches_raw_embeddings_with_repeated_indices():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(20, 12))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    x, y, a, b = [0, 1, 2, 3, 3], [4, 5, 6, 7], [8, 9, 10, 4], [11, 12, 12]  # 3 and 12 repeat, 4 in Y and A
    raw = association_test(emb[x], emb[y], emb[a], emb[b])
    via = association_test_from_similarity(sim, np.array(x), np.array(y), np.array(a), np.array(b))
    assert via.effect_size == pytest.approx(raw.effect_size, abs=1e-12)
    assert via.statistic == pytest.approx(raw.statistic, abs=1e-12)
    assert via.p_value == raw.p_value
    assert (via.n_x, via.n_y, via.n_a, via.n_b) == (5, 4, 4, 3)


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize("seed", range(8))
def test_true_ties_count_as_hits_whatever_the_summation_order(seed):
    """X and Y hold the same three images: 8 of the 20 splits tie with the observed one, 6 are above.

    Summed in different orders, the tied splits differ from the observed sum by an ulp for some seeds;
    they must still count (p = 14/20 both ways).
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3, 8))
    Y = X[[2, 0, 1]]
    A, B = rng.normal(size=(4, 8)), rng.normal(size=(5, 8))
    greater = association_test(X, Y, A, B)
    assert greater.p_value == 14 / 20
    assert greater.statistic == pytest.approx(0.0, abs=1e-14)
    assert association_test(X, Y, A, B, alternative="less").p_value == 14 / 20
    assert association_test(X, Y, A, B, alternative="two-sided").p_value == 1.0


def test_tie_tolerance_is_far_below_real_differences():
    s = np.array([0.1, 0.2, 0.3, -0.05])
    assert 0 < stats._tie_tolerance(s) < 1e-13


def test_all_targets_identical_gives_nan_d_and_p_one():
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(1, 5)), 4, axis=0)
    res = association_test(X[:2], X[2:], rng.normal(size=(3, 5)), rng.normal(size=(3, 5)))
    assert math.isnan(res.effect_size)
    assert res.p_value == 1.0


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_a_equal_to_b_gives_nan_d_in_any_order():
    X, Y, A, _ = _sets(20)
    assert math.isnan(association_test(X, Y, A, A).effect_size)
    # the same set in another order: s(w) is rounding noise of either sign, which used to give |d| ~ 1
    s = stats._scores(*stats._blocks_from_embeddings(X, Y, A, A[::-1])[:2])
    assert 0 < s.std(ddof=1) < 1e-15
    assert math.isnan(association_test(X, Y, A, A[::-1]).effect_size)


def test_targets_equal_up_to_float_noise_give_nan_d():
    rng = np.random.default_rng(21)
    w = _unit(rng.normal(size=(1, 8)))
    noisy = w + 1e-15 * rng.normal(size=(6, 8))
    A, B = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    s = stats._scores(*stats._blocks_from_embeddings(noisy[:3], noisy[3:], A, B)[:2])
    assert s.std(ddof=1) > 0  # the old rule (std == 0) gave d = -1.15 here
    res = association_test(noisy[:3], noisy[3:], A, B)
    assert math.isnan(res.effect_size)
    assert 0 < res.p_value <= 1  # p is what the permutation test gives
    ci = effect_size_ci(noisy[:3], noisy[3:], A, B, n_boot=50)
    assert ci.n_valid == 0 and math.isnan(ci.low)


def test_small_but_real_spread_gives_the_formula():
    """Targets 1e-6 apart (far above the rounding bound of ~1e-14): d is the textbook value."""
    rng = np.random.default_rng(22)
    w = _unit(rng.normal(size=(1, 8)))
    X = w + 1e-6 * rng.normal(size=(3, 8))
    Y = w + 1e-6 * rng.normal(size=(4, 8)) + 1e-6 * np.arange(8)
    A, B = rng.normal(size=(5, 8)), rng.normal(size=(6, 8))
    s, _, d, _, _ = _naive(X, Y, A, B)
    assert 1e-9 < np.std(s, ddof=1) < 1e-5
    res = association_test(X, Y, A, B)
    assert math.isfinite(res.effect_size)
    # s is a difference of cosines near 1e-6 apart: the naive and numpy sums agree to ~1e-10 relative
    assert res.effect_size == pytest.approx(d, rel=1e-6)


def test_spread_bound_follows_set_sizes_and_cosine_magnitude():
    ta, tb = np.full((4, 3), -0.5), np.full((4, 7), 0.25)
    assert stats._spread_bound(ta, tb) == 4 * np.finfo(float).eps * 10 * 0.5
    assert stats._spread_bound(np.zeros((2, 1)), np.zeros((2, 1))) == 0  # all-orthogonal: std 0 -> NaN


# --------------------------------------------------------------------------- alternatives, floors


def test_alternatives_are_consistent_for_exact_tests():
    X, Y, A, B = _sets(6)
    g = association_test(X, Y, A, B, alternative="greater")
    le = association_test(X, Y, A, B, alternative="less")
    two = association_test(X, Y, A, B, alternative="two-sided")
    # no ties: only the observed split is counted by both tails
    assert g.p_value + le.p_value == pytest.approx(1 + 1 / 924, abs=1e-15)
    assert two.p_value == min(1.0, 2 * min(g.p_value, le.p_value))
    assert (g.p_floor, le.p_floor, two.p_floor) == (1 / 924, 1 / 924, 2 / 924)
    # swapping X and Y mirrors the tails
    assert association_test(Y, X, A, B, alternative="less").p_value == g.p_value


def test_two_sided_is_capped_at_one():
    X, Y, A, B = _sets(7, shift=0.0)
    two = association_test(X, X[::-1], A, B, alternative="two-sided")
    assert two.p_value == 1.0


def test_sampled_floor_and_counts():
    X, Y, A, B = _sets(8, n_x=10, n_y=10)
    res = association_test(X, Y, A, B, permutations=500, seed=1)
    assert not res.exact
    assert res.n_permutations == 500
    assert res.p_floor == 1 / 500
    assert res.p_value * 500 == pytest.approx(round(res.p_value * 500))
    assert association_test(X, Y, A, B, permutations=500, alternative="two-sided").p_floor == 2 / 500
    assert association_test(X, Y, A, B, permutations=1).p_value == 1.0


def test_exact_rule_follows_number_of_splits():
    X, Y, A, B = _sets(9, n_x=7, n_y=7)
    assert association_test(X, Y, A, B, permutations=3432).exact
    assert not association_test(X, Y, A, B, permutations=3431).exact
    X8, Y8, A8, B8 = _sets(9, n_x=8, n_y=8)
    assert not association_test(X8, Y8, A8, B8).exact  # 12,870 splits > 10,000: the reference samples too


# --------------------------------------------------------------------------- exact vs sampled, determinism


@pytest.mark.parametrize("seed,shift", [(10, 0.0), (11, 0.6), (12, 1.2)])
def test_sampled_p_agrees_with_exact_p(seed, shift):
    X, Y, A, B = _sets(seed, n_x=7, n_y=6, shift=shift)
    exact = association_test(X, Y, A, B, permutations=10_000)
    sampled = association_test(X, Y, A, B, permutations=1_000, seed=seed)
    assert exact.exact and not sampled.exact
    se = math.sqrt(max(exact.p_value * (1 - exact.p_value), 1e-3) / 1_000)
    assert abs(sampled.p_value - exact.p_value) <= 4 * se + 1 / 1_000


@pytest.mark.parametrize("sizes", [(6, 6), (3, 9), (9, 3), (1, 5), (8, 8)])
def test_exact_dynamic_programme_equals_chunked_combinations(monkeypatch, sizes):
    X, Y, A, B = _sets(18, *sizes, shift=0.3)
    dup = association_test(X, np.concatenate([X[:1], Y[1:]]), A, B)  # a repeated image: true ties
    via_dp = [association_test(X, Y, A, B, permutations=20_000, alternative=alt) for alt in ("greater", "less")]
    monkeypatch.setattr(stats, "_DP_MAX_SPLITS", 0)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 64)
    via_combos = [association_test(X, Y, A, B, permutations=20_000, alternative=alt) for alt in ("greater", "less")]
    assert via_dp == via_combos
    assert association_test(X, np.concatenate([X[:1], Y[1:]]), A, B) == dup


def test_large_exact_enumeration_when_asked():
    X, Y, A, B = _sets(13, n_x=10, n_y=10, shift=0.5)
    exact = association_test(X, Y, A, B, permutations=1_000_000)
    assert exact.exact and exact.n_permutations == 184_756
    less = association_test(X, Y, A, B, permutations=1_000_000, alternative="less")
    assert exact.p_value + less.p_value == pytest.approx(1 + 1 / 184_756, abs=1e-12)
    sampled = association_test(X, Y, A, B, permutations=20_000, seed=3)
    assert abs(sampled.p_value - exact.p_value) < 0.01


def test_same_seed_identical_bytes_different_seed_differs():
    X, Y, A, B = _sets(14, n_x=12, n_y=12, shift=0.3)
    one = association_test(X, Y, A, B, seed=42)
    two = association_test(X, Y, A, B, seed=42)
    assert pickle.dumps(one) == pickle.dumps(two)
    assert association_test(X, Y, A, B, seed=43).p_value != one.p_value


@pytest.mark.parametrize("n_x,n_y,masks", [(9, 9, True), (7, 11, False), (20, 20, True), (16, 24, False)])
def test_sampled_p_counts_the_documented_random_splits(n_x, n_y, masks):
    """p is the share of the very splits of random_splits, summed one split at a time, for either draw."""
    assert stats._uses_masks(n_x + n_y, n_x) == masks
    X, Y, A, B = _sets(15, n_x=n_x, n_y=n_y, shift=0.2)
    res = association_test(X, Y, A, B, permutations=3_000, seed=7)
    s = stats._scores(*stats._blocks_from_embeddings(X, Y, A, B)[:2])
    observed = s[:n_x].sum()
    splits = np.concatenate(list(stats.random_splits(n_x + n_y, n_x, 2_999, seed=7)))
    assert splits.shape == (2_999, n_x)
    hits = 1 + sum(s[split].sum() >= observed for split in splits)
    assert res.p_value == hits / 3_000


def test_mask_draw_is_used_where_it_needs_at_most_n_x_outputs_per_split():
    assert [stats._uses_masks(*design) for design in [(12, 6), (18, 9), (40, 20), (40, 24), (64, 32)]] == [True] * 5
    # 2**40 / C(40, 16) = 17.5 outputs per split > 16; 65 bits do not fit one output; 2**4 / C(4, 2) > 2
    assert [stats._uses_masks(*design) for design in [(40, 16), (64, 24), (65, 32), (4, 2), (11, 4)]] == [False] * 5


def _mask_draw_loop(n: int, n_x: int, count: int, seed: int) -> list[list[int]]:
    """The mask draw as documented, one 64-bit output at a time (numpy's own call, not random_raw)."""
    rng = np.random.default_rng(seed)
    splits = []
    while len(splits) < count:
        w = int(rng.integers(0, 2**64, dtype=np.uint64)) & ((1 << n) - 1)
        if w.bit_count() == n_x:
            splits.append([i for i in range(n) if w >> i & 1])
    return splits


@pytest.mark.parametrize("n,n_x,count", [(40, 20, 300), (12, 6, 500), (13, 7, 200), (64, 32, 40), (50, 26, 60)])
def test_random_splits_follow_the_documented_mask_draw(n, n_x, count):
    assert stats._uses_masks(n, n_x)
    got = np.concatenate(list(stats.random_splits(n, n_x, count, seed=n)))
    assert got.dtype == np.int8 and got.tolist() == _mask_draw_loop(n, n_x, count, seed=n)


def test_mask_draw_is_uniform_seeded_and_chunk_invariant(monkeypatch):
    assert stats._uses_masks(8, 4)
    splits = np.concatenate(list(stats.random_splits(8, 4, 70_000, seed=1)))
    assert splits.shape == (70_000, 4) and (np.diff(splits, axis=1) > 0).all()  # distinct, increasing
    counts = np.unique(splits, axis=0, return_counts=True)[1]
    assert counts.size == 70  # all C(8, 4) subsets, equally often
    assert np.abs(counts - 1_000).max() < 5 * math.sqrt(1_000)
    assert not (np.concatenate(list(stats.random_splits(8, 4, 70_000, seed=2))) == splits).all()
    monkeypatch.setattr(stats, "_MASK_CHUNK_OUTPUTS", 1_001)  # many rounds, each cutting the stream anywhere
    chunks = list(stats.random_splits(8, 4, 70_000, seed=1))
    assert len(chunks) > 1 and (np.concatenate(chunks) == splits).all()
    assert (np.concatenate(list(stats.random_splits(8, 4, 100, seed=1))) == splits[:100]).all()
    sums = np.concatenate(list(stats._random_split_sums(np.arange(8.0), 4, 70_000, seed=1)))
    assert (sums == splits.sum(axis=1)).all()  # integers: exact in any order


def test_byte_tables_hold_every_subset_sum_of_each_byte():
    s = np.random.default_rng(23).normal(size=13)
    tables = stats._byte_tables(s)
    assert tables.shape == (2, 256)
    for v in (0, 1, 0b10110101, 255):
        bits = [j for j in range(8) if v >> j & 1]
        assert tables[0, v] == sum((s[j] for j in bits), 0.0)  # added in increasing j, as documented
        assert tables[1, v] == sum((s[8 + j] for j in bits if 8 + j < 13), 0.0)  # past n: 0
    masks = np.array([0b1_0000_0000_0001, 0b1_1111_1111_1111, 0], dtype=np.uint64)
    np.testing.assert_allclose(stats._mask_sums(tables, masks), [s[0] + s[12], s.sum(), 0.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_mask_draw_p_agrees_with_scipy_permutation_test(alternative):
    """Other splits than scipy's, so within Monte Carlo error: two independent estimates of p from 10,000."""
    from scipy import stats as scipy_stats

    X, Y, A, B = _sets(24, n_x=20, n_y=20, n_a=25, n_b=25, dim=32, shift=0.15)
    ours = association_test(X, Y, A, B, seed=5, alternative=alternative).p_value
    s = stats._scores(*stats._blocks_from_embeddings(X, Y, A, B)[:2])
    theirs = scipy_stats.permutation_test(
        (s[:20], s[20:]), lambda x, y, axis: x.sum(axis=axis) - y.sum(axis=axis), vectorized=True,
        n_resamples=9_999, permutation_type="independent", alternative=alternative, rng=5,
    ).pvalue  # fmt: skip
    assert 0.1 < theirs < 0.9  # away from 0 and 1, where Monte Carlo error is large
    se = math.sqrt(theirs * (1 - theirs) / 10_000) * (2 if alternative == "two-sided" else 1)
    assert abs(ours - theirs) < 4 * math.sqrt(2) * se


def test_random_splits_are_uniform_seeded_and_chunk_invariant(monkeypatch):
    assert not stats._uses_masks(5, 2)  # the Fisher-Yates draw
    splits = np.concatenate(list(stats.random_splits(5, 2, 30_000, seed=1)))
    assert splits.shape == (30_000, 2) and (splits[:, 0] != splits[:, 1]).all()
    counts = np.unique(np.sort(splits, axis=1), axis=0, return_counts=True)[1]
    assert counts.size == 10  # all C(5, 2) subsets, equally often
    assert np.abs(counts - 3_000).max() < 5 * math.sqrt(3_000)
    assert not (np.concatenate(list(stats.random_splits(5, 2, 30_000, seed=2))) == splits).all()
    monkeypatch.setattr(stats, "_SPLIT_CHUNK_ELEMENTS", 4_001)  # many chunks of an odd number of draws
    chunks = list(stats.random_splits(5, 2, 30_000, seed=1))
    assert len(chunks) > 1 and (np.concatenate(chunks) == splits).all()
    assert (np.concatenate(list(stats.random_splits(5, 2, 100, seed=1))) == splits[:100]).all()


def test_random_splits_follow_the_documented_per_split_draw():
    assert not stats._uses_masks(11, 4)  # the Fisher-Yates draw
    rng = np.random.default_rng(9)
    expected = []
    for _ in range(200):
        order = list(range(11))
        for i, j in enumerate(rng.integers(np.arange(4), 11)):
            order[i], order[j] = order[j], order[i]
        expected.append(order[:4])
    assert (np.concatenate(list(stats.random_splits(11, 4, 200, seed=9))) == np.array(expected)).all()


def test_fisher_yates_designs_keep_the_splits_and_p_of_the_previous_implementation():
    """Pinned from the implementation before the mask draw (sbssl 2026-11): designs that keep the
    Fisher-Yates draw (here n > 64, and 16 + 24) give the same splits and the same p for the same seed."""
    wide = np.concatenate(list(stats.random_splits(300, 4, 2, seed=5)))
    assert wide.tolist() == [[201, 241, 8, 242], [140, 155, 189, 87]] and wide.dtype == np.int16
    assert np.concatenate(list(stats.random_splits(40, 16, 1, seed=1))).tolist() == [
        [18, 20, 30, 38, 5, 10, 33, 3, 15, 0, 36, 23, 19, 35, 1, 25]
    ]
    X, Y, A, B = _sets(17, 16, 24, 25, 25, 64, 0.1)
    res = association_test(X, Y, A, B, seed=42)
    assert (res.p_value, res.statistic, res.effect_size) == (0.0237, 0.45184804524647276, 0.6535263550443589)
    assert association_test(X, Y, A, B, seed=0, alternative="two-sided").p_value == 0.044
    assert association_test(X, Y, A, B, seed=7, alternative="less").p_value == 0.9781


def test_mask_draw_splits_and_p_are_pinned():
    """Pinned at the change to the mask draw (2026-11-30): the same seed gives these splits and p from now on.
    The statistic and d are those of before the change (the draw does not touch them)."""
    first = np.concatenate(list(stats.random_splits(40, 20, 3, seed=1)))
    assert first.tolist() == [
        [2, 5, 8, 10, 11, 13, 14, 17, 18, 19, 21, 22, 23, 24, 26, 30, 32, 33, 36, 37],
        [2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 20, 23, 31, 33, 36, 39],
        [0, 3, 4, 5, 7, 8, 9, 10, 14, 19, 22, 23, 26, 27, 29, 30, 31, 32, 35, 39],
    ]
    assert first.dtype == np.int8
    pinned = {
        (14, 12, 12, 5, 7, 16, 0.3): (0.0455, 0.0812, 0.9558, 0.9470484570402982, 0.6940159385477719),
        (15, 20, 20, 25, 25, 64, 0.05): (0.5482, 0.8912, 0.4387, -0.038401639006886035, -0.04441508267080678),
        (16, 9, 11, 4, 6, 8, 0.0): (0.3023, 0.5916, 0.7072, 0.46454452320198436, 0.2450161609667919),
    }
    for args, (greater, two, less, statistic, d) in pinned.items():
        X, Y, A, B = _sets(*args)
        assert stats._uses_masks(args[1] + args[2], args[1])
        res = association_test(X, Y, A, B, seed=42)
        assert res.p_value == greater
        assert association_test(X, Y, A, B, seed=0, alternative="two-sided").p_value == two
        assert association_test(X, Y, A, B, seed=7, alternative="less").p_value == less
        # cosines are now dot products over norms (not products of rescaled unit rows): last bits only
        assert res.statistic == pytest.approx(statistic, abs=1e-14) and res.effect_size == pytest.approx(d, abs=1e-14)


def _stream(rng: np.random.Generator) -> dict:
    """What decides the rest of the stream: the state, and the buffered 32-bit half only when there is one
    (numpy leaves a stale value behind when there is none)."""
    state = rng.bit_generator.state
    return {**state, "uinteger": state["uinteger"] if state["has_uint32"] else None}


@pytest.mark.parametrize("counts", [(1,), (2, 3), (7, 1, 1000), (1001, 1000, 3), (0, 5)])
def test_next_uint32s_is_numpys_stream(counts):
    fast, ref = np.random.default_rng(11), np.random.default_rng(11)
    for count in counts:
        got = stats._next_uint32s(fast, count)
        assert got.dtype == np.uint32 and got.shape == (count,)
        assert (got == ref.integers(0, 1 << 32, size=count, dtype=np.uint32)).all()
        assert _stream(fast) == _stream(ref)
    assert fast.integers(0, 10, size=50).tolist() == ref.integers(0, 10, size=50).tolist()


def _reference_positions(rng, n, n_x, m):
    j = rng.integers(np.arange(n_x), n, size=(m, n_x))
    return j.T * m + np.arange(m)


@pytest.mark.parametrize("n,n_x,m", [(40, 20, 999), (5, 2, 1), (2, 1, 300), (127, 60, 41), (300, 7, 100), (1 << 16, 3, 50)])
def test_swap_positions_are_numpys_draw(n, n_x, m):
    fast, ref = np.random.default_rng(n), np.random.default_rng(n)
    for _ in range(3):  # successive chunks continue the same stream
        assert (stats._swap_positions(fast, n, n_x, m) == _reference_positions(ref, n, n_x, m)).all()
        assert _stream(fast) == _stream(ref)


def test_swap_positions_take_numpys_redraws():
    """A 32-bit output that Lemire's method rejects (numpy draws another): rare at iEAT sizes, so this uses a
    span with a high rejection rate; the seed is one whose stream has such an output among the first m."""
    n, m, seed = 65_175, 60_000, 0  # 2^32 mod 65,175 = 65,146: rejection probability 1.5e-5 per draw
    u = np.random.default_rng(seed).integers(0, 1 << 32, size=m, dtype=np.uint32).astype(np.uint64)
    assert ((u * n) % (1 << 32) < (1 << 32) % n).sum() == 4  # the case under test happens
    fast, ref = np.random.default_rng(seed), np.random.default_rng(seed)
    assert (stats._swap_positions(fast, n, 1, m) == _reference_positions(ref, n, 1, m)).all()
    assert _stream(fast) == _stream(ref)


def test_index_dtype_is_the_smallest_holding_n():
    assert [stats._index_dtype(n) for n in (1, 128, 129, 32_768, 32_769)] == [np.int8, np.int8, np.int16, np.int16, np.int32]


def test_fast_cosines_fall_back_to_rescaled_rows_outside_the_safe_range():
    X, Y, A, B = _sets(19)
    ref = stats._blocks_from_embeddings(X, Y, A, B)
    for scale in (1e160, 1e-160):  # squared norms overflow / lose digits: rescaled path
        scaled = X.copy()
        scaled[1] *= scale
        assert stats._rows_and_norms(scaled) is None
        got = stats._blocks_from_embeddings(scaled, Y, A, B)
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-15)
        np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-15)
    rows, norms = stats._rows_and_norms(X)
    np.testing.assert_allclose(norms, np.linalg.norm(X, axis=1), rtol=1e-15)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_seeded_and_brackets_d():
    X, Y, A, B = _sets(16, n_x=8, n_y=8, shift=1.0)
    d = association_test(X, Y, A, B).effect_size
    ci = effect_size_ci(X, Y, A, B, n_boot=500, seed=1)
    assert ci == effect_size_ci(X, Y, A, B, n_boot=500, seed=1)
    assert ci != effect_size_ci(X, Y, A, B, n_boot=500, seed=2)
    assert ci.low < d < ci.high
    assert (ci.confidence, ci.n_boot, ci.n_valid, ci.seed) == (0.95, 500, 500, 1)
    narrow = effect_size_ci(X, Y, A, B, n_boot=500, seed=1, confidence=0.5)
    assert ci.low < narrow.low < narrow.high < ci.high


def test_bootstrap_ci_is_that_of_the_previous_implementation():
    """Pinned from the implementation before the speed-ups of 2026-11: the same seed gives the same interval
    (from a similarity matrix, to the last bit; from raw embeddings, whose cosines are now formed otherwise,
    to 1e-12)."""
    rng = np.random.default_rng(17)
    emb = rng.normal(size=(16, 6))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sets = np.arange(0, 4), np.arange(4, 9), np.arange(9, 12), np.arange(12, 16)
    ci = effect_size_ci_from_similarity(unit @ unit.T, *sets, n_boot=2000, seed=3)
    assert (ci.low, ci.high, ci.n_valid) == (-1.4843388311296997, 1.453988057108673, 2000)
    raw = effect_size_ci(*_sets(16, n_x=8, n_y=8, shift=1.0), n_boot=2000, seed=3)
    assert raw.low == pytest.approx(0.9319559426278786, abs=1e-12)
    assert raw.high == pytest.approx(1.855158079904259, abs=1e-12)


def test_resample_counts_count_each_rows_draws():
    counts = stats._resample_counts(np.random.default_rng(3), 5, 400)
    draws = np.random.default_rng(3).integers(0, 5, size=(400, 5))
    assert (counts == np.array([np.bincount(row, minlength=5) for row in draws])).all()
    assert (counts.sum(axis=1) == 5).all()


def test_bootstrap_from_similarity_equals_raw():
    rng = np.random.default_rng(17)
    emb = rng.normal(size=(16, 6))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    x, y, a, b = np.arange(0, 4), np.arange(4, 9), np.arange(9, 12), np.arange(12, 16)
    raw = effect_size_ci(emb[x], emb[y], emb[a], emb[b], n_boot=300, seed=3)
    via = effect_size_ci_from_similarity(unit @ unit.T, x, y, a, b, n_boot=300, seed=3)
    assert via.low == pytest.approx(raw.low, abs=1e-12) and via.high == pytest.approx(raw.high, abs=1e-12)


def test_bootstrap_skips_undefined_replicates():
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(1, 5)), 2, axis=0)
    ci = effect_size_ci(X[:1], X[1:], rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), n_boot=20)
    assert ci.n_valid == 0 and math.isnan(ci.low) and math.isnan(ci.high)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n_boot": 0}, "n_boot"), ({"n_boot": 2.5}, "n_boot"), ({"confidence": 1.0}, "confidence"),
     ({"confidence": 0}, "confidence"), ({"seed": None}, "seed")],
)  # fmt: skip
def test_bootstrap_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        effect_size_ci(*_sets(0), **kwargs)


# --------------------------------------------------------------------------- multiple testing


def test_adjust_p_values_known_values_keep_input_order():
    p = [0.03, 0.01, 0.05, 0.02, 0.04]
    order = [2, 0, 4, 1, 3]
    expected_sorted = {
        "holm": [0.05, 0.08, 0.09, 0.09, 0.09],
        "bonferroni": [0.05, 0.10, 0.15, 0.20, 0.25],
        "bh": [0.05] * 5,
        "fdr_bh": [0.05] * 5,
        "by": [0.05 * (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5)] * 5,
        "fdr_by": [0.05 * (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5)] * 5,
    }
    for method, exp in expected_sorted.items():
        got = adjust_p_values(p, method)
        np.testing.assert_allclose(got, [exp[i] for i in order], atol=1e-12, err_msg=method)
    np.testing.assert_allclose(adjust_p_values([0.5, 0.9], "bonferroni"), [1.0, 1.0])
    assert adjust_p_values([], "holm").size == 0


@pytest.mark.parametrize(
    "p,method,match",
    [([0.1], "sidak", "method"), ([0.1, 1.2], "holm", r"\[0, 1\]"), ([0.1, float("nan")], "bh", r"\[0, 1\]"),
     ([-0.1], "holm", r"\[0, 1\]"), ([[0.1, 0.2]], "holm", "1-D")],
)  # fmt: skip
def test_adjust_p_values_bad_input(p, method, match):
    with pytest.raises(ValueError, match=match):
        adjust_p_values(p, method)


# --------------------------------------------------------------------------- input errors


def _replace(sets, index, value):
    out = list(sets)
    out[index] = value
    return out


@pytest.mark.parametrize("index,name", list(enumerate("XYAB")))
def test_errors_name_the_set(index, name):
    sets = _sets(20)
    dim = sets[0].shape[1]
    cases = {
        "empty": (np.empty((0, dim)), "empty"),
        "1-D": (np.ones(dim), "2-D"),
        "zero dims": (np.empty((3, 0)), "zero dimensions"),
        "text": ([["a", "b"]], "numeric"),
        "nan": (_replace(list(sets[index]), 1, np.full(dim, np.nan)), "NaN or inf in row"),
        "inf": (_replace(list(sets[index]), 0, np.r_[np.inf, np.ones(dim - 1)]), r"NaN or inf in row\(s\) \[0\]"),
        "zero vector": (_replace(list(sets[index]), 2, np.zeros(dim)), r"zero vector\(s\) in row\(s\) \[2\]"),
    }
    if index:  # X fixes the dimension the others must match
        cases["dim"] = (np.ones((3, dim + 1)), "does not match X's dimension")
    for label, (bad, match) in cases.items():
        with pytest.raises(ValueError, match=f"^{name}: .*{match}") as info:
            association_test(*_replace(sets, index, bad))
        assert info.value.args[0].startswith(f"{name}:"), label
        with pytest.raises(ValueError, match=f"^{name}: "):
            effect_size_ci(*_replace(sets, index, bad))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"permutations": 0}, "permutations"), ({"permutations": True}, "permutations"),
     ({"permutations": 10.0}, "permutations"), ({"seed": None}, "seed"), ({"seed": 1.5}, "seed"),
     ({"alternative": "two.sided"}, "alternative")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        association_test(*_sets(0), **kwargs)
    with pytest.raises(ValueError, match=match):
        association_test_from_similarity(np.eye(4), [0], [1], [2], [3], **kwargs)


def test_similarity_errors():
    sim = np.eye(6)
    ok = dict(x=[0, 1], y=[2, 3], a=[4], b=[5])
    with pytest.raises(ValueError, match="^similarity: expected a square"):
        association_test_from_similarity(np.ones((3, 4)), **ok)
    with pytest.raises(ValueError, match="^similarity: expected a square"):
        association_test_from_similarity(np.ones(6), **ok)
    for name in "xyab":
        for bad, match in [([], "empty"), ([0, 6], r"out of range \[0, 6\)"), ([-1], "out of range"),
                           ([0.0, 1.0], "integers"), ([[0, 1]], "1-D"), ([True, False], "integers")]:  # fmt: skip
            with pytest.raises(ValueError, match=f"^{name.upper()}: .*{match}"):
                association_test_from_similarity(sim, **{**ok, name: bad})
    bad = sim.copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"similarity: NaN or inf between the targets and A \(target rows \[1\]\)"):
        association_test_from_similarity(bad, **ok)
    bad = sim.copy()
    bad[3, 5] = np.inf
    with pytest.raises(ValueError, match="and B"):
        effect_size_ci_from_similarity(bad, **ok)
    # NaN outside the blocks the test reads is irrelevant
    far = np.pad(sim, ((0, 1), (0, 1)), constant_values=np.nan)
    assert association_test_from_similarity(far, **ok).p_value == association_test_from_similarity(sim, **ok).p_value


def test_memory_layout_does_not_change_the_bytes():
    """The same values in C or Fortran order give bit-identical d, statistic and p (norms summed in one order)."""
    rng = np.random.default_rng(5)
    sets = [rng.standard_normal((n, 64)) for n in (6, 7, 8, 9)]
    c_order = association_test(*sets, permutations=500, seed=1)
    f_order = association_test(*[np.asfortranarray(s) for s in sets], permutations=500, seed=1)
    assert c_order == f_order
