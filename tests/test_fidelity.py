"""Fidelity table, Spearman's rank correlation, seed band and paired launches (synthetic frames)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.fidelity import (
    fidelity_table,
    section,
    seed_band,
    spearman,
)
from pipeline.stats import pack_bits, paired_launches


def _trials(vals: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"number": range(len(vals)), "state": "COMPLETE",
                         "val_cert_acc": vals, "published": [i < 2 for i in range(len(vals))],
                         "train_seed": [100, 101] + [None] * (len(vals) - 2),
                         "val_n": 300, "val_cert_lo": [v - 0.05 for v in vals],
                         "val_cert_hi": [v + 0.05 for v in vals]})


def _launches(rows: list[tuple[int, float]]) -> pd.DataFrame:
    return pd.DataFrame({"trial": [r[0] for r in rows], "test_cert_acc": [r[1] for r in rows],
                         "n_test": 200, "val_cert_acc": math.nan})


def test_table_averages_launch_seeds_and_takes_trial_scores():
    t = _trials([0.40, 0.42, 0.30, 0.50])
    la = _launches([(3, 0.60), (3, 0.50), (0, 0.45), (2, 0.30)])
    table = fidelity_table(t, la)
    assert table["trial"].tolist() == [0, 2, 3]
    row = table[table["trial"] == 3].iloc[0]
    assert row["test_cert_acc"] == pytest.approx(0.55) and row["seeds"] == 2
    assert (row["test_cert_min"], row["test_cert_max"]) == (0.50, 0.60)
    assert row["val_cert_acc"] == 0.50


def test_spearman_monotone_and_reversed():
    t = _trials([0.1, 0.2, 0.3, 0.4, 0.5])
    same = fidelity_table(t, _launches([(i, 0.1 * i + 0.01) for i in range(5)]))
    assert spearman(same)["rho"] == pytest.approx(1.0) and spearman(same)["n"] == 5
    rev = fidelity_table(t, _launches([(i, 0.9 - 0.1 * i) for i in range(5)]))
    assert spearman(rev)["rho"] == pytest.approx(-1.0)
    few = fidelity_table(t, _launches([(0, 0.2), (1, 0.3)]))
    assert math.isnan(spearman(few)["rho"]) and spearman(few)["n"] == 2


def test_seed_band_and_section_text():
    t = _trials([0.40, 0.46, 0.30, 0.50])
    band = seed_band(t)
    assert band["number"].tolist() == [0, 1]
    lines = "\n".join(section(t, _launches([(i, 0.1 * i) for i in range(4)]), {}))
    assert "Seed band of the published point (2 training seeds): 40.0–46.0%" in lines
    # ranks of val 2,3,1,4 against test 1,2,3,4: rho = 1 - 6*6/(4*15) = 0.4
    assert "Spearman ρ = 0.400" in lines and "n = 4" in lines
    assert "[35.0, 45.0]" in lines  # the interval of trial 0


def test_paired_launches():
    a = {"test_cert_bits": {**pack_bits([True] * 30 + [False] * 10), "first_index": 0}}
    b = {"test_cert_bits": {**pack_bits([True] * 20 + [False] * 20), "first_index": 0}}
    d = paired_launches(a, b)
    assert d["diff"] == pytest.approx(0.25) and d["only_a"] == 10 and d["only_b"] == 0
    assert d["p"] < 0.01
    c = {"test_cert_bits": {**pack_bits([True] * 40), "first_index": 5}}
    with pytest.raises(ValueError, match="different test images"):
        paired_launches(a, c)
