"""Acceptance: the catalogue + statistics reproduce all 117 published iEAT results from the authors' embeddings.

d within 1e-6; every p the reference computed exactly (C(2n, n) <= 10,000) identical to 1e-12; the sampled
p (the reference drew 9,999 unseeded shuffles) within 0.02.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sbssl.precomputed import run_catalogue
from sbssl.published import read_ieat_published

# Model names of the published table -> model part of the embedding file names.
MODELS = {"igpt": "igpt_l_32", "igpt-logit": "igpt-logit_l_32", "simclr": "simclr_152_3x_sk1"}


@pytest.fixture(scope="module")
def published() -> pd.DataFrame:
    # The published table ships with the checkout (data/published/); only the embeddings need ../shared.
    table = read_ieat_published()
    assert len(table) == 117 and set(table["Model"]) == set(MODELS)
    return table


@pytest.mark.parametrize(
    "published_model",
    # simclr's 6144-d CSVs take 10-35 s to parse on a busy 2-core machine
    ["igpt", "igpt-logit", pytest.param("simclr", marks=pytest.mark.slow)],
)
def test_reproduces_published_ieat_results(shared_dir, repo_dir, published, published_model):
    # Each concept file is read once per model inside run_catalogue (simclr's 6144-d CSVs take most of the time).
    ours = run_catalogue(
        shared_dir / "ieat" / "embeddings", MODELS[published_model], repo_dir / "config" / "tests.yaml",
        permutations=10_000, seed=0,
    ).set_index("title")  # fmt: skip
    rows = published[published["Model"] == published_model]
    assert len(rows) == 39 and set(rows["Test"]) == set(ours.index)
    problems = []
    n_exact = 0
    for row in rows.itertuples():
        got = ours.loc[row.Test]
        reference_exact = math.comb(2 * row.n_t, row.n_t) <= 10_000
        if (got["n_x"], got["n_y"], got["n_a"], got["n_b"]) != (row.n_t, row.n_t, row.n_a, row.n_a):
            sizes = got[["n_x", "n_y", "n_a", "n_b"]].tolist()
            problems.append(f"{row.Test}: set sizes {sizes} vs n_t={row.n_t}, n_a={row.n_a}")
        if abs(got["d"] - row.d) > 1e-6:
            problems.append(f"{row.Test}: d {got['d']!r} vs published {row.d!r}")
        if bool(got["exact"]) != reference_exact:
            problems.append(f"{row.Test}: exact={got['exact']} but the reference's exact={reference_exact}")
        elif reference_exact:
            n_exact += 1
            if abs(got["p"] - row.p) > 1e-12:
                problems.append(f"{row.Test}: exact p {got['p']!r} vs published {row.p!r}")
        elif abs(got["p"] - row.p) > 0.02:
            problems.append(f"{row.Test}: sampled p {got['p']!r} vs published {row.p!r}")
    assert not problems, "\n".join(problems)
    assert n_exact == 12  # 9 tests with 6 images a side, 2 with 7, Disability with 4
