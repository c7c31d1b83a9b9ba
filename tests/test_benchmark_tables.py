"""The statistics behind docs/lofit_results.md's TruthfulQA tables (benchmarks/lofit_tables.py)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lofit_tables  # found through the sys.path entry above


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


def _exact_match_run(method: str, seed: int, correct: list[bool], **extra) -> dict:
    """A row as ``lofit_exact_match.py --json`` writes it, read back as ``load_runs`` does."""
    n = len(correct)
    p = sum(correct) / n
    row = {"method": method, "seed": seed, "n": n, "accuracy": p, "accuracy_se": math.sqrt(p * (1 - p) / (n - 1)),
           "per_example": correct, "params": 512, **extra}
    row = lofit_tables.exact_match_row(row)
    return {**row, "kind": lofit_tables.kind_of(row)}


def test_exact_match_sections_name_the_tasks_and_show_the_searches():
    """CLUTRR's sections: the ablation's rows name CLUTRR and the task whose heads (b) used (read from the
    row's label), the validation searches are in exact-match terms, and the claims pair per example."""
    base = _exact_match_run("base model", 42, [False, False, True, False])
    lofit = _exact_match_run("LoFiT (3% = 8 heads)", 42, [True, True, True, False], heads=[(1, 0), (2, 3)])
    iti = _exact_match_run("ITI (8 heads, α = 5)", 42, [False, True, True, False], params=0, computed_values=512,
                           choice={"heads": 8, "alpha": 5.0}, search={"8": {"5.0": 0.25, "10.0": 0.125}})
    other = _exact_match_run("LoFiT (3% = 8 heads selected for TruthfulQA (fold 0))", 42, [True, False, True, False],
                             ablation="other", heads=[(1, 0), (4, 4)])
    random_heads = _exact_match_run("LoFiT (3% = 8 random heads)", 42, [False, True, True, False], ablation="random",
                                    heads=[(5, 5), (6, 6)])
    rows = [base, lofit, iti, other, random_heads]
    assert lofit_tables.other_task(rows) == "TruthfulQA (fold 0)"
    sections = lofit_tables.render_exact_match(rows, "CLUTRR", n_val=100)
    main, ablation = sections["main"], sections["ablation"]
    assert "validation exact match % by α" in main and "α 5: 25.0, α 10: 12.5" in main
    assert "ITI: seed 42: K = 8, α = 5" in main and "(100 examples;" in main
    assert "LoFiT 3% − ITI" in main and "paired" in main
    assert "LoFiT 3% − LoFiT 3% on TruthfulQA's heads" in main
    assert "(a) heads selected for CLUTRR" in ablation and "(b) heads selected for TruthfulQA (fold 0)" in ablation
    assert "exact match % (test)" in ablation and "(b) seed 42: 1 of 2" in ablation
    assert "ablation" not in lofit_tables.render_exact_match([base, lofit, iti], "CLUTRR")


def test_combined_runs_show_the_command_that_reproduces_them():
    """``lofit_exact_match.py --combine`` shows each setting that differs from the defaults as ``--set``."""
    import lofit_exact_match
    defaults = lofit_exact_match.default_settings("clutrr", quick=False)
    run = {**defaults, "lofit": {**defaults["lofit"], "epochs": 1}, "seed": 43, "device": "cuda", "n_train": 3151}
    assert lofit_exact_match.overrides_of(run, defaults) == ["lofit.epochs=1", "seed=43"]
    assert lofit_exact_match.overrides_of(defaults, defaults) == []


def test_a_table_with_other_epochs_says_so_in_its_heading():
    """The 1-epoch CLUTRR table and the default-epochs one get different headings."""
    import lofit_exact_match
    defaults = lofit_exact_match.default_settings("clutrr", quick=False)
    one = {**defaults, **{m: {**defaults[m], "epochs": 1} for m in ("lofit", "loreft", "lora")}}
    assert lofit_exact_match.epochs_note(one, defaults) == ", 1 epoch per trained method"
    assert lofit_exact_match.epochs_note(defaults, defaults) == ""
    mixed = {**defaults, "lofit": {**defaults["lofit"], "epochs": 1}}
    assert lofit_exact_match.epochs_note(mixed, defaults) == ""


def test_combine_writes_its_own_section_with_the_settings_of_the_methods_it_shows(tmp_path, monkeypatch):
    """``--combine ... --section NAME`` writes NAME (not the task's section) and lists the settings of the methods
    its runs have only (the 3-epoch CLUTRR runs: LoFiT and LoRA, no LoReFT)."""
    import lofit_exact_match
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    doc = tmp_path / "results.md"
    doc.write_text("<!-- clutrr:begin -->\nmain table\n<!-- clutrr:end -->\n")
    monkeypatch.setattr(lofit_exact_match, "RESULTS", doc)
    lofit_exact_match.main(["--task", "clutrr", "--section", "clutrr-3-epochs", "--combine",
                            str(results / "lofit_clutrr_3epochs_seed42.json"),
                            str(results / "lofit_clutrr_3epochs_lora_seed42.json")])
    text = doc.read_text()
    assert "<!-- clutrr:begin -->\nmain table\n<!-- clutrr:end -->" in text
    section = text.split("<!-- clutrr-3-epochs:begin -->", 1)[1].split("<!-- clutrr-3-epochs:end -->", 1)[0]
    assert "### CLUTRR, SmolLM2-135M-Instruct (full configuration)\n" in section
    assert "* LoFiT: head selection 2 epochs" in section and "offsets 3 epochs" in section
    assert "* LoRA (PEFT)" in section and "* LoReFT" not in section
    assert "LoFiT 10% − LoRA" in section


@pytest.mark.parametrize("task", ["clutrr", "mquake"])
def test_contrast_pairs_share_a_prompt_and_differ_in_the_answer(task):
    """ITI's and RepE's classes on the exact-match tasks: each negative is its positive's prompt with a wrong
    answer (CLUTRR: another relation; MQuAKE: the answer before the edit), drawn reproducibly with the seed."""
    import lofit_exact_match

    from reftlib import ReftError
    from reftlib.evaluation import find_data_dir, load_clutrr, load_mquake

    try:
        data_dir = find_data_dir()
    except ReftError as exc:
        pytest.skip(f"benchmark data folder (../shared/data) is absent: {exc}")
    pos, neg = lofit_exact_match.contrast_texts(task, data_dir, limit=50, seed=42)
    assert len(pos) == len(neg) == 50 and len(set(pos)) == 50
    assert (pos, neg) == lofit_exact_match.contrast_texts(task, data_dir, limit=50, seed=42)
    assert pos != lofit_exact_match.contrast_texts(task, data_dir, limit=50, seed=43)[0]
    if task == "clutrr":
        rows = {r.prompt: r for r in load_clutrr("train", data_dir)}
        relations = {r.target for r in rows.values()}
    else:
        rows = {r.prompt: r for r in load_mquake("train", data_dir)}
    for p, n in zip(pos, neg):
        prompt = next(q for q in rows if p.startswith(q + " ") and n.startswith(q + " "))
        right, wrong = p[len(prompt) + 1:], n[len(prompt) + 1:]
        if task == "clutrr":
            assert right == rows[prompt].target and wrong in relations and wrong != right
        else:
            assert right == rows[prompt].answer and wrong == rows[prompt].original_answer
            assert wrong.lower() != right.lower()


def test_a_later_run_replaces_the_same_method_and_seed(tmp_path):
    """Combining runs: a re-run of a method on a seed replaces the earlier file's row (not a third seed),
    other rows stay, and the tables name what was replaced."""
    def run(name: str, seed: int, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"settings": {"seed": seed}, "machine": {}, "results": rows}))
        return path

    loreft = "LoReFT (rank 4, layer 15, last prompt token)"
    first = run("first.json", 42, [{"method": "base model", "mc1": 0.2, "mc2": 0.4, "n": 4},
                                   {"method": loreft, "mc1": 0.5, "mc2": 0.6, "n": 4}])
    again = run("again.json", 42, [{"method": loreft, "mc1": 0.75, "mc2": 0.7, "n": 4}])
    other_seed = run("other.json", 43, [{"method": loreft, "mc1": 0.25, "mc2": 0.5, "n": 4}])
    rows, headers = lofit_tables.load_runs([first, again, other_seed])
    assert [(r["method"], r["seed"], r["mc1"]) for r in rows] == [
        ("base model", 42, 0.2), (loreft, 42, 0.75), (loreft, 43, 0.25)]
    assert headers[0]["replaced"] == [f"{loreft}, seed 42 (by `again.json`)"] and not headers[1]["replaced"]
    assert "`first.json`: " + loreft in lofit_tables.replaced_note(headers)
    assert lofit_tables.replaced_note(headers[1:]) == ""
