"""The statistics behind docs/lofit_results.md's TruthfulQA tables (benchmarks/lofit_tables.py)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
lofit_tables = pytest.importorskip("lofit_tables")


def _run(method: str, seed: int, mc1: list[float], mc2: list[float], **extra) -> dict:
    n = len(mc1)
    row = {"method": method, "seed": seed, "n": n, "mc1": sum(mc1) / n, "mc2": sum(mc2) / n, "params": 512, **extra}
    if extra.pop("keep_per_question", True):
        row["per_question"] = {"mc1": mc1, "mc2": mc2}
        row["mc1_se"] = statistics.stdev(mc1) / math.sqrt(n)
        row["mc2_se"] = statistics.stdev(mc2) / math.sqrt(n)
    row.pop("keep_per_question", None)
    return {**row, "kind": lofit_tables.kind_of(row)}


def test_paired_difference_uses_the_same_questions():
    a = _run("LoFiT (10% = 27 heads)", 42, [1, 1, 0, 1, 0, 1], [0.9, 0.8, 0.2, 0.7, 0.4, 0.6])
    b = _run("ITI (8 heads, α = 10)", 42, [1, 0, 0, 1, 0, 0], [0.8, 0.3, 0.1, 0.7, 0.4, 0.2])
    delta, se, kind = lofit_tables.difference([a], [b], "mc2")
    d = [x - y for x, y in zip(a["per_question"]["mc2"], b["per_question"]["mc2"])]
    assert kind == "paired"
    assert delta == pytest.approx(100 * statistics.fmean(d))
    assert se == pytest.approx(100 * statistics.stdev(d) / math.sqrt(len(d)))
    assert lofit_tables.verdict(delta, se) == "ahead"
    assert lofit_tables.verdict(-delta, se) == "behind"
    assert lofit_tables.verdict(0.5 * se, se) == "tie" and lofit_tables.verdict(-se, se) == "tie"


def test_unpaired_difference_without_per_question_scores():
    """A run that kept only its means (an older JSON) is compared with sqrt(SE_a² + SE_b²); MC1's SE is
    recomputed from the mean (Bernoulli, sample variance)."""
    a = _run("LoRA (r=8, q_proj/v_proj)", 42, [1, 1, 0, 1], [0.9, 0.8, 0.2, 0.7], keep_per_question=False)
    b = _run("LoReFT (rank 4, layer 15, last prompt token)", 42, [1, 0, 0, 0], [0.5, 0.5, 0.2, 0.1])
    assert "per_question" not in a
    se_a = math.sqrt(0.75 * 0.25 / 3)
    assert lofit_tables.run_se(a, "mc1") == pytest.approx(se_a)
    delta, se, kind = lofit_tables.difference([a], [b], "mc1")
    assert kind == "unpaired" and delta == pytest.approx(50.0)
    assert se == pytest.approx(100 * math.hypot(se_a, b["mc1_se"]))
    assert lofit_tables.difference([a], [b], "mc2")[2] == "n/a"  # no MC2 SE recorded for a
    assert lofit_tables.verdict(1.0, math.nan) == "?"


def test_seeds_average_and_the_base_model_counts_once():
    base_old = _run("base model", 42, [0, 1, 0, 0], [0.2, 0.6, 0.1, 0.3], keep_per_question=False)
    base = _run("base model", 43, [0, 1, 0, 0], [0.2, 0.6, 0.1, 0.3])
    lofit = [_run("LoFiT (3% = 8 heads)", s, m1, [0.5] * 4) for s, m1 in ((42, [1, 1, 0, 0]), (43, [1, 1, 1, 0]))]
    random_heads = _run("LoFiT (3% = 8 random heads)", 42, [0, 1, 0, 0], [0.3] * 4, ablation="random")
    by = lofit_tables.by_kind([base_old, base, *lofit, random_heads])
    assert by["base"] == [base]  # the evaluation with per-question scores is kept
    assert [r["seed"] for r in by["lofit3"]] == [42, 43] and by["lofit-random"] == [random_heads]
    assert lofit_tables.summary(by["lofit3"], "mc1")[0] == pytest.approx(62.5)
    text = lofit_tables.claims_table([base, *lofit, random_heads])
    assert "LoFiT 3% − LoFiT 3% on random heads" in text
    # a method with one seed is compared on that seed only
    one_seed = lofit_tables.difference(by["lofit3"], by["lofit-random"], "mc1")
    assert one_seed[0] == pytest.approx(100 * (lofit[0]["mc1"] - random_heads["mc1"])) and one_seed[2] == "paired"
