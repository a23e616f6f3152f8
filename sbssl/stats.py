"""Embedding association tests (iEAT / WEAT): statistic, effect size, permutation p-value, bootstrap CI.

Definitions (Caliskan et al. 2017; Steed & Caliskan 2021), for target sets X, Y and attribute sets A, B:

- ``s(w, A, B) = mean_{a in A} cos(w, a) - mean_{b in B} cos(w, b)`` for every target image w.
- statistic ``= sum_{x in X} s(x) - sum_{y in Y} s(y)``.
- effect size ``d = (mean_X s - mean_Y s) / std_{w in X u Y} s(w)`` with ``ddof=1``.
- p-value: permutation test over the splits of ``X u Y`` into a part of size |X| and a part of size |Y|.
  Because ``sum_X' s + sum_Y' s`` is the same for every split, ranking splits by ``sum_X' s`` ranks them
  by the statistic, so only ``sum_X' s`` is computed. Upper tail (``alternative="greater"``): the share
  of splits whose ``sum_X' s`` is >= the observed one. Exact enumeration of all ``C(|X|+|Y|, |X|)``
  splits when that number is <= ``permutations``; otherwise Monte Carlo: the observed split plus
  ``permutations - 1`` uniformly random splits from ``numpy.random.default_rng(seed)``,
  ``p = (1 + hits) / permutations``. This is the reference iEAT definition at ``permutations=10_000``.

Undefined effect size: d is NaN when the spread of s is within the rounding error of s itself, i.e.
``std(s) <= _spread_bound = 4 eps (n_a + n_b) c`` with ``c`` the largest |cos| between a target and an
attribute. Why this bound: a float64 mean of n terms of magnitude <= c errs by at most about n eps c in any
summation order, so each s(w) errs by at most (n_a + n_b) eps c, two scores that are equal in exact
arithmetic (one image repeated, A equal to B up to order, targets equal up to float noise) can differ by
twice that, and the ddof=1 std of values inside a band of width w is at most w / sqrt(2). Such scores thus
have std(s) <= sqrt(2) (n_a + n_b) eps c; the factor 4 leaves margin (as the tie tolerance below does).
Below the bound d would be the ratio of two rounding errors (any value, of either sign); above it the
spread is real however small, and d is the formula's value (real spreads of iEAT data lie over ten orders
of magnitude above the bound). The same rule marks bootstrap replicates undefined.

Floating-point ties: the same split summed in a different order can differ from the observed sum by a
few ulps, so a plain ``>=`` would count or miss true ties (repeated images, the observed split itself)
by chance (tests/test_stats.py has cases where it does). A split is counted as a tie, and so as a hit
for either tail, when its sum lies within a bound of the summation rounding error of the observed sum,
``_tie_tolerance`` = 8 n eps sum|s| (about 1e-14 for iEAT data). Genuinely different splits lie many
orders of magnitude further apart, so this only decides true ties, always in the conservative direction
(as the reference's ``si == s`` branch intends). All 36 exact published iEAT p-values are reproduced.

Two entry points share one core: :func:`association_test` (raw embeddings, cosine computed in float64 as
the dot product of the two rows over the product of their norms) and
:func:`association_test_from_similarity` (index arrays into a precomputed cosine-similarity matrix; what
the workflow uses). Nothing loops in Python per permutation: splits are generated in chunks (exact: a
subset-sum dynamic programme, or ``itertools.combinations`` consumed by ``numpy.fromiter`` beyond
``_DP_MAX_SPLITS``; sampled: :func:`random_splits`, either n-bit masks with n_x ones, rejection-sampled from
the generator's raw 64-bit outputs and summed by one look-up per byte in tables of subset sums of s, or,
where few n-bit patterns have n_x ones, a partial Fisher-Yates shuffle vectorised across splits on small
integer indices, its draw computed from the generator's raw 32-bit outputs exactly as numpy's bounded draw
does, summed one X position at a time), so memory stays bounded and the same seed gives identical bytes.
Nothing is cached across calls.

Change of 2026-11 (speed): the same seed gives the same splits as before, and the same p (each split's
sum is now accumulated in another order, which only matters for a sum within a few ulps of the edge of
the tie tolerance; none in 300 random designs, ties included, nor in the 117 published iEAT rows). The
statistic and d of :func:`association_test` (raw embeddings) can differ from before in the last bits
(about 1e-15): the cosines were formed from rescaled unit rows. tests/test_stats.py pins both.

Change of 2026-11-30 (draw): sampled designs with n <= 64 and ``2**n <= n_x C(n, n_x)`` (e.g. 20 + 20)
now take the mask draw of :func:`random_splits`, which gives other splits for the same seed than the
Fisher-Yates draw they took before, so their p moves within Monte Carlo error (standard error at most 0.005
at 10,000 permutations); the statistic and d are unchanged. Other designs give the same splits and p as
before. tests/test_stats.py pins the new splits and p.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

ALTERNATIVES = ("greater", "less", "two-sided")
ADJUST_METHODS = {
    "holm": "holm",
    "bonferroni": "bonferroni",
    "bh": "fdr_bh",
    "fdr_bh": "fdr_bh",
    "by": "fdr_by",
    "fdr_by": "fdr_by",
}
# Array elements per chunk of splits or bootstrap replicates: 2^16 int64 = 512 KiB stays in the CPU
# cache (larger chunks measured slower), while the Python overhead per chunk stays negligible.
_CHUNK_ELEMENTS = 1 << 16
# Exact tests with at most this many splits get every split sum at once (~2 float64 arrays of that size).
_DP_MAX_SPLITS = 1 << 22
# Array elements per chunk of random splits (n x splits small integers, plus two uint32 arrays of n_x x splits):
# one chunk for 10,000 splits of up to 52 images, about 3 MB at 40; fewer Python steps per split than smaller
# chunks, which measured slower.
_SPLIT_CHUNK_ELEMENTS = 1 << 19
# Raw 64-bit outputs per round of the mask draw (1 MiB): one round for 10,000 splits wherever a split needs
# at most 12 outputs on average (8 at 20 + 20, 10 at 32 + 32).
_MASK_CHUNK_OUTPUTS = 1 << 17


@dataclass(frozen=True)
class AssociationResult:
    """Outcome of one association test.

    statistic: sum_X s - sum_Y s (cosine units). effect_size: d (dimensionless; NaN when undefined: every s(w)
    is equal up to rounding, see the module docstring).
    p_value: permutation p for ``alternative``. n_permutations: splits evaluated (all of them when exact).
    exact: whether every split was enumerated. p_floor: smallest p this design can produce.
    n_x, n_y, n_a, n_b: set sizes (repeated images counted each time).
    """

    statistic: float
    effect_size: float
    p_value: float
    n_permutations: int
    exact: bool
    p_floor: float
    alternative: str
    n_x: int
    n_y: int
    n_a: int
    n_b: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EffectSizeCI:
    """Percentile bootstrap confidence interval for d (``low``, ``high``) and how it was made.

    n_valid: replicates with a defined d (a replicate whose resampled targets all have the same s up to
    rounding is undefined, by the module's rule); low and high are NaN when there are none.
    """

    low: float
    high: float
    confidence: float
    n_boot: int
    n_valid: int
    seed: int


# --------------------------------------------------------------------------- input checks


def _as_embeddings(name: str, arr: Any, dim: int | None = None) -> np.ndarray:
    """Unit-length (n, D) float64 copy of one set of embeddings, or ValueError naming the set."""
    try:
        out = np.array(arr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not a numeric array ({exc})") from None
    if out.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (images x dimensions), got shape {out.shape}")
    if out.shape[0] == 0:
        raise ValueError(f"{name}: empty set, need at least one image")
    if out.shape[1] == 0:
        raise ValueError(f"{name}: embeddings have zero dimensions")
    if dim is not None and out.shape[1] != dim:
        raise ValueError(f"{name}: dimension {out.shape[1]} does not match X's dimension {dim}")
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1)).tolist()
        raise ValueError(f"{name}: NaN or inf in row(s) {bad}")
    # Scale each row by its largest |value| first so the norm neither overflows nor underflows.
    peak = np.abs(out).max(axis=1)
    if (peak == 0).any():
        raise ValueError(f"{name}: zero vector(s) in row(s) {np.flatnonzero(peak == 0).tolist()} (cosine undefined)")
    out /= peak[:, None]
    out /= np.linalg.norm(out, axis=1)[:, None]
    return out


def _as_indices(name: str, idx: Any, n: int) -> np.ndarray:
    """1-D intp index array into a matrix with ``n`` rows, or ValueError naming the set."""
    out = np.asarray(idx)
    if out.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of indices, got shape {out.shape}")
    if out.size == 0:
        raise ValueError(f"{name}: empty set, need at least one image")
    if not np.issubdtype(out.dtype, np.integer):
        raise ValueError(f"{name}: indices must be integers, got dtype {out.dtype}")
    if out.min() < 0 or out.max() >= n:
        raise ValueError(f"{name}: index out of range [0, {n}) (min {out.min()}, max {out.max()})")
    return out.astype(np.intp)


def _check_integer(name: str, value: Any, *, positive: bool = False) -> None:
    """ValueError unless ``value`` is an int (not a bool), and >= 1 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (positive and value < 1):
        kind = "a positive integer" if positive else "an integer (for reproducible results)"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_options(permutations: int, seed: int, alternative: str) -> None:
    _check_integer("permutations", permutations, positive=True)
    _check_integer("seed", seed)
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def _check_block(name: str, block: np.ndarray) -> None:
    if not np.isfinite(block).all():
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1)).tolist()
        raise ValueError(f"similarity: NaN or inf between the targets and {name} (target rows {rows})")


# --------------------------------------------------------------------------- core


def _scores(sim_ta: np.ndarray, sim_tb: np.ndarray) -> np.ndarray:
    """s(w, A, B) for every target row: (n_targets,) from (n_targets, n_a) and (n_targets, n_b) cosines."""
    return sim_ta.mean(axis=1) - sim_tb.mean(axis=1)


def _spread_bound(sim_ta: np.ndarray, sim_tb: np.ndarray) -> float:
    """Largest std(s) that rounding alone can produce: 4 eps (n_a + n_b) max|cos| (module docstring)."""
    c = max(float(np.abs(sim_ta).max()), float(np.abs(sim_tb).max()))
    return 4.0 * np.finfo(np.float64).eps * (sim_ta.shape[1] + sim_tb.shape[1]) * c


def _effect_size(s: np.ndarray, n_x: int, spread_bound: float) -> float:
    """d of target scores ``s`` (X first); NaN when ``std(s) <= spread_bound`` (undefined)."""
    std = s.std(ddof=1)
    if std <= spread_bound:
        return math.nan
    return float((s[:n_x].mean() - s[n_x:].mean()) / std)


def _tie_tolerance(s: np.ndarray) -> float:
    """Bound on the rounding error between two summation orders of the same split.

    Each of the two sums of at most n terms errs by at most (n - 1) eps sum|s| whatever the order
    (sequential or pairwise); a factor of 4 on top leaves margin.
    """
    return 8.0 * s.size * np.finfo(np.float64).eps * float(np.abs(s).sum())


def _subset_sums(s: np.ndarray, k: int) -> np.ndarray:
    """Sums of all C(n, k) k-element subsets of ``s`` (in no particular order), by dynamic programming.

    ``layers[c]`` holds the sums of the c-subsets of the elements seen so far; each element extends every
    layer at once, and layers too small to reach k with the remaining elements are dropped, so the peak
    size stays about C(n, k). One Python step per (element, layer), none per split.
    """
    n = s.size
    layers = [np.zeros(1)] + [np.empty(0)] * k
    for j, value in enumerate(s):
        for c in range(min(k, j + 1), 0, -1):
            layers[c] = np.concatenate([layers[c], layers[c - 1] + value])
        for c in range(max(0, k - (n - j - 1))):
            layers[c] = np.empty(0)
    return layers[k]


def _exact_split_sums(s: np.ndarray, n_x: int) -> Iterator[np.ndarray]:
    """sum_X' s for every split, in chunks: all at once by :func:`_subset_sums` up to ``_DP_MAX_SPLITS``
    splits, else ``itertools.combinations`` in chunks of ``_CHUNK_ELEMENTS`` indices (bounded memory)."""
    if math.comb(s.size, n_x) <= _DP_MAX_SPLITS:
        yield _subset_sums(s, n_x)
        return
    combos = itertools.combinations(range(s.size), n_x)
    rows = max(1, _CHUNK_ELEMENTS // n_x)
    while True:
        flat = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, rows)), dtype=np.intp)
        if flat.size == 0:
            return
        yield s[flat.reshape(-1, n_x)].sum(axis=1)


def _next_uint32s(rng: np.random.Generator, count: int) -> np.ndarray:
    """The next ``count`` 32-bit outputs of ``rng``'s bit generator, (count,) uint32, consuming the stream
    exactly as ``rng.integers(0, 2**32, size=count, dtype=np.uint32)`` does (and returning the same values).

    PCG64 (what ``default_rng`` makes) serves 32-bit outputs as the halves of its 64-bit ones, low half
    first, keeping the high half for the next request; on a little-endian machine ``random_raw`` viewed as
    uint32 is that sequence without a call per value. Any other case takes numpy's call.
    """
    bitgen = rng.bit_generator
    state = bitgen.state
    if state["bit_generator"] != "PCG64" or state["has_uint32"] or sys.byteorder != "little":
        return rng.integers(0, 1 << 32, size=count, dtype=np.uint32)
    halves = bitgen.random_raw((count + 1) // 2).view(np.uint32)
    if count % 2:  # the unused high half stays buffered, as after numpy's call
        state = bitgen.state
        state["has_uint32"], state["uinteger"] = 1, int(halves[count])
        bitgen.state = state
    return halves[:count]


def _swap_positions(rng: np.random.Generator, n: int, n_x: int, m: int) -> np.ndarray:
    """The documented draw of m splits, ``j = rng.integers(arange(n_x), n, size=(m, n_x))``, as flat positions
    ``j[k, i] * m + k`` (uint32, shape (n_x, m)) into an (n, m) array whose column k is split k.

    numpy draws each j with Lemire's method on one 32-bit output u: ``j - low = (u * span) >> 32`` with
    span = n - low, drawing again only when the low 32 bits of ``u * span`` fall below
    ``(2^32 - span) % span`` (probability below span / 2^32). Here all u are drawn at once and the products
    formed in uint32 arithmetic (hence n <= 2^16); when any u would be redrawn (about once in 10^4 tests of
    10,000 splits of 40 images) the stream is rewound and numpy's own call is made, so the draw is always
    numpy's and the stream is left where numpy leaves it.
    """
    lows = np.arange(n_x, dtype=np.uint32)[:, None]
    state = rng.bit_generator.state
    redraw = n > 1 << 16
    if not redraw:
        span = np.uint32(n) - lows
        drawn = _next_uint32s(rng, m * n_x)
        u = drawn.reshape(m, n_x).T.copy()  # (n_x, m): long inner loops below
        low = np.multiply(u, span, out=drawn.reshape(n_x, m))  # uint32 wraps: the low 32 bits of u * span
        redraw = bool((low < (((1 << 32) - span.astype(np.uint64)) % span).astype(np.uint32)).any())
    if redraw:
        rng.bit_generator.state = state
        pos = rng.integers(lows[:, 0], n, size=(m, n_x)).T.astype(np.uint32)
    else:
        # high 32 bits of u * span, with u = a 2^16 + b: (a span + (b span >> 16)) >> 16, every term < 2^32
        np.bitwise_and(u, 0xFFFF, out=low)
        low *= span
        low >>= 16
        u >>= 16
        u *= span
        u += low
        u >>= 16
        u += lows
        pos = u
    pos *= np.uint32(m)
    pos += np.arange(m, dtype=np.uint32)
    return pos


def _index_dtype(n: int) -> type[np.signedinteger]:
    """Smallest signed integer type holding 0 .. n - 1 (less memory traffic per split than intp)."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if n - 1 <= np.iinfo(t).max)


def _x_sides(n: int, n_x: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """The Fisher-Yates draw of :func:`random_splits`, chunk by chunk, transposed: (n_x, splits) arrays, column
    k = split k."""
    rng = np.random.default_rng(seed)
    dtype = _index_dtype(n)
    identity = np.arange(n, dtype=dtype)[:, None]
    rows = max(1, _SPLIT_CHUNK_ELEMENTS // n)
    done = 0
    while done < count:
        m = min(rows, count - done)
        swap = _swap_positions(rng, n, n_x, m)
        perm = np.empty((n, m), dtype=dtype)  # column k = split k
        perm[:] = identity
        flat = perm.reshape(-1)
        x_side = np.empty((n_x, m), dtype=dtype)
        for i in range(n_x):
            # Step i reads only positions >= i, so position i itself need not be written.
            target = swap[i].astype(np.intp)
            flat.take(target, out=x_side[i])
            flat[target] = perm[i]
        yield x_side
        done += m


def _uses_masks(n: int, n_x: int) -> bool:
    """Whether splits of n targets with n_x in X are drawn as masks (:func:`random_splits`): n <= 64 and
    ``2**n <= n_x * C(n, n_x)``. The mask draw spends ``2**n / C(n, n_x)`` raw outputs per split on average, the
    Fisher-Yates draw n_x bounded draws and swaps, which cost about as much (measured: each draw is the faster
    one on its side of this line, up to the cases near it)."""
    return n <= 64 and 2**n <= n_x * math.comb(n, n_x)


def _split_masks(n: int, n_x: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """The mask draw of :func:`random_splits`, chunk by chunk: uint64 arrays whose bit i is set when target i
    is in X'. Each round draws enough outputs for the remaining splits in most cases (5% over the expected
    number), at most ``_MASK_CHUNK_OUTPUTS``; the accepted outputs do not depend on how the stream is cut."""
    bitgen = np.random.default_rng(seed).bit_generator
    acceptance = math.comb(n, n_x) / 2**n
    keep = np.uint64((1 << n) - 1)
    done = 0
    while done < count:
        raw = bitgen.random_raw(min(_MASK_CHUNK_OUTPUTS, int((count - done) / acceptance * 1.05) + 64))
        raw &= keep
        masks = raw.compress(np.bitwise_count(raw) == n_x)[: count - done]
        done += masks.size
        if masks.size:
            yield masks


def _byte_tables(s: np.ndarray) -> np.ndarray:
    """(ceil(n / 8), 256) float64 subset sums of ``s`` by byte: entry [b, v] is the sum of ``s[8 b + j]`` over
    the set bits j of v, added in increasing j (entry [b, 0] = 0). Positions past n count as 0."""
    padded = np.zeros((-(-s.size // 8), 8))
    padded.reshape(-1)[: s.size] = s
    tables = np.zeros((padded.shape[0], 256))
    for j in range(8):
        np.add(tables[:, : 1 << j], padded[:, j : j + 1], out=tables[:, 1 << j : 2 << j])
    return tables


def _mask_sums(tables: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """sum_X' s of each mask, (m,) float64 from (m,) uint64 masks and the :func:`_byte_tables` of s: one table
    look-up per byte of the mask, added byte 0 first."""
    parts = np.asarray(masks, dtype="<u8").view(np.uint8).reshape(-1, 8)  # column b = bits 8b .. 8b + 7
    sums = tables[0].take(parts[:, 0])
    for b in range(1, tables.shape[0]):
        sums += tables[b].take(parts[:, b])
    return sums


def random_splits(n: int, n_x: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """X sides of ``count`` uniformly random splits of ``range(n)``, in chunks of shape (splits, n_x).

    rng = ``numpy.random.default_rng(seed)``. Two draws, chosen by the sizes alone:

    - mask draw, when n <= 64 and ``2**n <= n_x * C(n, n_x)`` (the expected number of outputs per split, 8 at
      20 + 20 and 10 at 32 + 32, is at most n_x; e.g. 6 + 6, 20 + 20, 32 + 32, not |X| = 16 with |Y| = 24):
      take the generator's
      successive raw 64-bit outputs (``rng.bit_generator.random_raw()``, the same values as
      ``rng.integers(0, 2**64, dtype=numpy.uint64)``), keep the low n bits, ``w = out & (2**n - 1)``, and
      accept w when exactly n_x of its bits are set; the split's X side is the set bits' positions, in
      increasing order. Rejection sampling from uniform bits makes every n_x-subset equally likely.
    - Fisher-Yates draw otherwise: with ``j = rng.integers(arange(n_x), n)`` per split, swap positions i and
      j[i] of ``arange(n)`` for i = 0 .. n_x-1 and keep the first n_x entries. The j of all splits in a chunk
      are drawn at once in row order, which consumes the stream exactly as successive per-split draws do, and
      the swaps run on every split of a chunk at once (one Python step per X position).

    Either way the splits do not depend on the chunk size, and the first k splits are the same for any
    ``count`` >= k. Indices have the smallest integer dtype that holds n - 1 (int8 up to 128 images).
    """
    if _uses_masks(n, n_x):
        dtype = _index_dtype(n)
        positions = np.arange(n, dtype=np.uint64)
        for masks in _split_masks(n, n_x, count, seed):
            bits = (masks[:, None] >> positions) & np.uint64(1)
            yield np.nonzero(bits)[1].astype(dtype).reshape(-1, n_x)
        return
    for x_side in _x_sides(n, n_x, count, seed):
        yield x_side.T


def _random_split_sums(s: np.ndarray, n_x: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """sum_X' s over the splits of :func:`random_splits` (``count`` of them, same seed), in chunks.

    Mask draw: one look-up per byte of each mask in the byte tables of ``s`` (:func:`_byte_tables`).
    Fisher-Yates draw: accumulated one X position at a time. No (splits, n_x) array of floats is made.
    """
    if _uses_masks(s.size, n_x):
        tables = _byte_tables(s)
        for masks in _split_masks(s.size, n_x, count, seed):
            yield _mask_sums(tables, masks)
        return
    for x_side in _x_sides(s.size, n_x, count, seed):
        sums = s.take(x_side[0])
        for row in x_side[1:]:
            sums += s.take(row)
        yield sums


def _permutation_p(
    s: np.ndarray, n_x: int, permutations: int, seed: int, alternative: str
) -> tuple[float, int, bool, float]:
    """(p_value, n_permutations, exact, p_floor) for target scores ``s`` whose first ``n_x`` entries are X."""
    n_splits = math.comb(s.size, n_x)
    exact = n_splits <= permutations
    observed = s[np.arange(n_x)[None, :]].sum(axis=1)[0]
    tol = _tie_tolerance(s)
    if exact:
        sums = _exact_split_sums(s, n_x)
        total, ge, le = 0, 0, 0
    else:
        sums = _random_split_sums(s, n_x, permutations - 1, seed)
        total, ge, le = 1, 1, 1  # the observed split
    for chunk in sums:
        total += chunk.size
        ge += int(np.count_nonzero(chunk >= observed - tol))
        le += int(np.count_nonzero(chunk <= observed + tol))
    p_greater, p_less = ge / total, le / total
    if alternative == "greater":
        p, floor = p_greater, 1 / total
    elif alternative == "less":
        p, floor = p_less, 1 / total
    else:
        p, floor = min(1.0, 2 * min(p_greater, p_less)), min(1.0, 2 / total)
    return p, total, exact, floor


def _test_from_blocks(
    sim_ta: np.ndarray, sim_tb: np.ndarray, n_x: int, permutations: int, seed: int, alternative: str
) -> AssociationResult:
    s = _scores(sim_ta, sim_tb)
    p, total, exact, floor = _permutation_p(s, n_x, permutations, seed, alternative)
    return AssociationResult(
        statistic=float(s[:n_x].sum() - s[n_x:].sum()),
        effect_size=_effect_size(s, n_x, _spread_bound(sim_ta, sim_tb)),
        p_value=float(p),
        n_permutations=int(total),
        exact=bool(exact),
        p_floor=float(floor),
        alternative=alternative,
        n_x=int(n_x),
        n_y=int(s.size - n_x),
        n_a=int(sim_ta.shape[1]),
        n_b=int(sim_tb.shape[1]),
    )


def _blocks_from_embeddings(X: Any, Y: Any, A: Any, B: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Cosine blocks (targets x A, targets x B) in float64 from raw embeddings; targets = X then Y.

    Each cosine is the float64 dot product of the two raw rows divided by the product of their norms (one
    pass over the data for the norms, one for the products). When a row's squared norm is outside
    [2^-500, 2^500] (where a product could overflow or lose digits to underflow), zero, NaN or inf, or a set
    has a wrong shape, every set is checked and rescaled to unit rows by :func:`_as_embeddings` instead
    (which names the set in its errors).
    """
    fast = [_rows_and_norms(arr) for arr in (X, Y, A, B)]
    if any(f is None for f in fast) or len({f[0].shape[1] for f in fast}) != 1:  # type: ignore[index]
        x = _as_embeddings("X", X)
        units = [x, *(_as_embeddings(name, arr, x.shape[1]) for name, arr in (("Y", Y), ("A", A), ("B", B)))]
        fast = [(unit, np.ones(unit.shape[0])) for unit in units]
    rows, norms = (np.concatenate(parts) for parts in zip(*fast))  # type: ignore[arg-type]
    n_x, n_t, n_a = fast[0][0].shape[0], fast[0][0].shape[0] + fast[1][0].shape[0], fast[2][0].shape[0]  # type: ignore[index]
    cos = rows[:n_t] @ rows[n_t:].T  # one product: tiny, threads cost more than it
    cos /= np.outer(norms[:n_t], norms[n_t:])
    return cos[:, :n_a], cos[:, n_a:], n_x


def _rows_and_norms(arr: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(``arr`` as float64 (n, D), its row norms) when every row suits the fast cosine path, else None."""
    try:
        # C order: the norms' summation order must not depend on the caller's layout (same input, same bytes)
        rows = np.ascontiguousarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if rows.ndim != 2 or 0 in rows.shape:
        return None
    squares = np.einsum("ij,ij->i", rows, rows)
    with np.errstate(invalid="ignore"):  # NaN fails the test, as it should
        if not ((squares >= 2.0**-500) & (squares <= 2.0**500)).all():
            return None
    return rows, np.sqrt(squares)


def _blocks_from_similarity(
    similarity: Any, x: Any, y: Any, a: Any, b: Any
) -> tuple[np.ndarray, np.ndarray, int]:
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity: expected a square 2-D matrix, got shape {sim.shape}")
    n = sim.shape[0]
    xi, yi, ai, bi = (_as_indices(name, idx, n) for name, idx in (("X", x), ("Y", y), ("A", a), ("B", b)))
    targets = np.concatenate([xi, yi])
    sim_ta = np.asarray(sim[np.ix_(targets, ai)], dtype=np.float64)
    sim_tb = np.asarray(sim[np.ix_(targets, bi)], dtype=np.float64)
    _check_block("A", sim_ta)
    _check_block("B", sim_tb)
    return sim_ta, sim_tb, xi.size


# --------------------------------------------------------------------------- public API


def association_test(
    X: Any,
    Y: Any,
    A: Any,
    B: Any,
    *,
    permutations: int = 10_000,
    seed: int = 0,
    alternative: str = "greater",
) -> AssociationResult:
    """Association test on raw embeddings: X (n_x, D), Y (n_y, D), A (n_a, D), B (n_b, D), rows = images.

    Cosine similarities are computed in float64. See the module docstring for the definitions,
    the exact/Monte Carlo rule and the treatment of floating-point ties.
    Raises ValueError naming the set for empty sets, mismatched dimensions, NaN/inf or zero vectors.
    """
    _check_options(permutations, seed, alternative)
    sim_ta, sim_tb, n_x = _blocks_from_embeddings(X, Y, A, B)
    return _test_from_blocks(sim_ta, sim_tb, n_x, permutations, seed, alternative)


def association_test_from_similarity(
    similarity: Any,
    x: Any,
    y: Any,
    a: Any,
    b: Any,
    *,
    permutations: int = 10_000,
    seed: int = 0,
    alternative: str = "greater",
) -> AssociationResult:
    """Association test on a precomputed (n, n) cosine-similarity matrix.

    x, y, a, b: 1-D integer index arrays into the matrix (an index may repeat, e.g. an image used in two
    folders). Only the target-by-attribute blocks are read (and checked for NaN/inf).
    """
    _check_options(permutations, seed, alternative)
    sim_ta, sim_tb, n_x = _blocks_from_similarity(similarity, x, y, a, b)
    return _test_from_blocks(sim_ta, sim_tb, n_x, permutations, seed, alternative)


def _resample_counts(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """(m, n) int counts: row k counts how often each of range(n) is drawn in n draws with replacement."""
    draws = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]
    return np.bincount(draws.ravel(), minlength=m * n).reshape(m, n)


def _bootstrap_ci(
    sim_ta: np.ndarray, sim_tb: np.ndarray, n_x: int, n_boot: int, confidence: float, seed: int
) -> EffectSizeCI:
    """Percentile bootstrap of d, resampling with replacement within X, Y, A and B independently.

    A resampled attribute set is a vector of counts (how often each image was drawn; counted with one
    ``bincount`` per chunk, which is several times faster than ``Generator.multinomial`` row by row), so
    one replicate's s(w) for all targets is one matrix product; X and Y are then resampled from those
    scores. Replicates are drawn in chunks whose size depends only on the set sizes, so the same inputs
    and seed give the same interval.
    """
    _check_integer("n_boot", n_boot, positive=True)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    _check_integer("seed", seed)
    rng = np.random.default_rng(seed)
    n_t, n_a = sim_ta.shape
    n_b = sim_tb.shape[1]
    n_y = n_t - n_x
    bound = _spread_bound(sim_ta, sim_tb)
    rows = max(1, _CHUNK_ELEMENTS // max(n_t, n_a, n_b))
    ds = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        wa = _resample_counts(rng, n_a, m) / n_a
        wb = _resample_counts(rng, n_b, m) / n_b
        s = wa @ sim_ta.T - wb @ sim_tb.T  # (m, n_t)
        # Row k: replicate k's resampled X scores, then its Y scores (one gather from the flat scores).
        picks = np.concatenate([rng.integers(0, n_x, size=(m, n_x)), rng.integers(n_x, n_t, size=(m, n_y))], axis=1)
        picks += np.arange(0, m * n_t, n_t)[:, None]
        both = s.reshape(-1).take(picks)
        std = both.std(axis=1, ddof=1)
        gap = np.add.reduce(both[:, :n_x], axis=1) / n_x - np.add.reduce(both[:, n_x:], axis=1) / n_y
        with np.errstate(divide="ignore", invalid="ignore"):
            ds[start : start + m] = np.where(std > bound, gap / std, np.nan)
    finite = ds[np.isfinite(ds)]
    if finite.size == 0:
        return EffectSizeCI(math.nan, math.nan, confidence, n_boot, 0, int(seed))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return EffectSizeCI(float(low), float(high), float(confidence), int(n_boot), int(finite.size), int(seed))


def effect_size_ci(
    X: Any, Y: Any, A: Any, B: Any, *, n_boot: int = 2_000, confidence: float = 0.95, seed: int = 0
) -> EffectSizeCI:
    """Seeded percentile bootstrap CI for d from raw embeddings (same shapes and checks as association_test)."""
    sim_ta, sim_tb, n_x = _blocks_from_embeddings(X, Y, A, B)
    return _bootstrap_ci(sim_ta, sim_tb, n_x, n_boot, confidence, seed)


def effect_size_ci_from_similarity(
    similarity: Any,
    x: Any,
    y: Any,
    a: Any,
    b: Any,
    *,
    n_boot: int = 2_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> EffectSizeCI:
    """Seeded percentile bootstrap CI for d from a cosine-similarity matrix and index arrays."""
    sim_ta, sim_tb, n_x = _blocks_from_similarity(similarity, x, y, a, b)
    return _bootstrap_ci(sim_ta, sim_tb, n_x, n_boot, confidence, seed)


def adjust_p_values(p_values: Sequence[float] | np.ndarray, method: str = "holm") -> np.ndarray:
    """Multiple-testing adjusted p-values (statsmodels ``multipletests``), same order as the input.

    method: holm | bonferroni | bh (= fdr_bh, Benjamini-Hochberg) | by (= fdr_by, Benjamini-Yekutieli).
    """
    from statsmodels.stats.multitest import multipletests

    if method not in ADJUST_METHODS:
        raise ValueError(f"method must be one of {sorted(ADJUST_METHODS)}, got {method!r}")
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values: expected a 1-D sequence, got shape {p.shape}")
    if p.size == 0:
        return p.copy()
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("p_values: every p-value must be a finite number in [0, 1]")
    return multipletests(p, method=ADJUST_METHODS[method])[1]
