"""LoFiT results over several runs (seeds): the main table, the claims, the validation searches, the ablation.

``python benchmarks/lofit_truthfulqa.py --combine RUN.json [RUN.json ...]`` (and ``lofit_exact_match.py
--task clutrr|mquake --combine ...``) reads the JSON files the benchmark's ``--json`` wrote (one or more
methods per file, each with its seed) and renders the sections of ``docs/lofit_results.md`` from
them, without running anything.

Statistics (all on the same test questions or examples):

* a method's cell is the mean over its seeds, ``± SE`` the standard error of one run over the
  questions (MC1: ``sqrt(p(1 − p) / (n − 1))``; MC2: the sample standard deviation over questions
  ``/ sqrt(n)``), averaged over the runs that recorded it. Seeds change the training pairs, the
  initial values, the data order and (ITI) the probes' split; they do not resample the questions,
  so averaging seeds does not shrink this error;
* a difference between two methods is compared with the standard error of the difference. Where
  both methods have per-question scores for the same seed it is the *paired* one (standard
  deviation of the per-question differences ``/ sqrt(n)``, averaged over those seeds); otherwise the
  unpaired ``sqrt(SE_a² + SE_b²)`` with each method's one-run SE (as in its cell), which is larger. A
  difference is taken over the seeds both methods have; within one such SE it is a **tie**.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from common import describe_machine, markdown_table

#: Method kinds in table order, with the label of their row.
KINDS = {
    "base": "base model",
    "iti": "ITI (probe-selected heads, mass-mean shift; K, α tuned on validation)",
    "repe": "RepE (PCA reading vectors; layers, α tuned on validation)",
    "lora": "LoRA (r=8, q_proj/v_proj)",
    "loreft": "LoReFT (rank 4, layer 15, last prompt token)",
    "lofit3": "LoFiT (3% = 8 heads)",
    "lofit10": "LoFiT (10% = 27 heads)",
}
#: The localization ablation's rows (``{task}``/``{other}``: the task's and the other task's names).
ABLATION = {
    "lofit3": "(a) heads selected for {task}",
    "lofit-other": "(b) heads selected for {other}",
    "lofit-random": "(c) random heads (same count)",
}
#: The comparisons that decide the LoFiT paper's claims: (claim, kind a, kind b).
CLAIMS = [
    ("LoFiT beats ITI", "lofit3", "iti"),
    ("LoFiT beats ITI", "lofit10", "iti"),
    ("LoFiT beats RepE", "lofit3", "repe"),
    ("LoFiT beats RepE", "lofit10", "repe"),
    ("LoFiT matches LoRA", "lofit10", "lora"),
    ("LoFiT matches LoRA", "lofit3", "lora"),
    ("LoFiT vs LoReFT", "lofit10", "loreft"),
    ("task-specific heads matter", "lofit3", "lofit-random"),
    ("task-specific heads matter", "lofit3", "lofit-other"),
]
METRICS = ("mc1", "mc2")
#: Column names of the metrics (``em``: exact match, the rows of ``lofit_exact_match.py``).
METRIC_NAMES = {"mc1": "MC1 %", "mc2": "MC2 %", "em": "exact match %"}


def kind_of(result: dict[str, Any]) -> str:
    """The method kind of a result row (rows written before ``kind`` existed are read from their label)."""
    if "ablation" in result:
        return f"lofit-{result['ablation']}"
    label = result["method"]
    for prefix, kind in (("base", "base"), ("ITI", "iti"), ("RepE", "repe"), ("LoRA", "lora"), ("LoReFT", "loreft"),
                         ("LoFiT (3%", "lofit3"), ("LoFiT (10%", "lofit10")):
        if label.startswith(prefix):
            return kind
    raise ValueError(f"unknown method row {label!r}")


def run_se(result: dict[str, Any], metric: str) -> float | None:
    """One run's standard error over the questions (recomputed for MC1 from its mean when not recorded)."""
    if f"{metric}_se" in result:
        return result[f"{metric}_se"]
    if metric == "mc1":
        p, n = result["mc1"], result["n"]
        return math.sqrt(p * (1 - p) / (n - 1))
    return None


def exact_match_row(r: dict[str, Any]) -> dict[str, Any]:
    """A ``lofit_exact_match.py`` row in this module's terms: metric ``em`` with its SE and per-example scores."""
    return {**r, "em": r["accuracy"], "em_se": r.get("accuracy_se"),
            "per_question": {"em": [float(x) for x in r["per_example"]]}}


def load_runs(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every result row of the files (each tagged with its seed, kind and file), and each file's header.

    A trained method's row replaces an earlier file's row of the same method and seed (a re-run); the
    header of the file whose row was replaced lists it under ``"replaced"``, so the tables can say so."""
    rows: list[dict[str, Any]] = []
    headers: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        header = {"file": Path(path).name, "settings": data["settings"], "machine": data["machine"],
                  "task": data.get("task", "truthfulqa"), "replaced": []}
        headers.append(header)
        for r in data["results"]:
            r = exact_match_row(r) if "accuracy" in r else r
            r = {**r, "seed": r.get("seed", data["settings"]["seed"]), "kind": kind_of(r), "file": header["file"]}
            earlier = next((i for i, old in enumerate(rows) if r["kind"] != "base" and old["file"] != header["file"]
                            and (old["method"], old["seed"]) == (r["method"], r["seed"])), None)
            if earlier is not None:
                old = rows.pop(earlier)
                next(h for h in headers if h["file"] == old["file"])["replaced"].append(
                    f"{old['method']}, seed {old['seed']} (by `{header['file']}`)")
            rows.append(r)
    return rows, headers


def replaced_note(headers: Sequence[dict[str, Any]]) -> str:
    """A sentence naming the rows a later run replaced (empty when none was)."""
    replaced = [f"`{h['file']}`: {item}" for h in headers for item in h.get("replaced", ())]
    return (" Rows replaced by a later run of the same method and seed: " + "; ".join(replaced) + ".") if replaced else ""


def by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows grouped by method kind, in seed order (the base model once)."""
    out: dict[str, list[dict[str, Any]]] = {}
    # the base model does not depend on the seed: one evaluation is enough, preferably one with per-question scores
    bases = sorted((r for r in rows if r["kind"] == "base"), key=lambda r: "per_question" not in r)
    for r in bases[:1] + sorted((r for r in rows if r["kind"] != "base"), key=lambda r: r["seed"]):
        out.setdefault(r["kind"], []).append(r)
    return out


def summary(runs: Sequence[dict[str, Any]], metric: str) -> tuple[float, float | None]:
    """Mean over the runs and the averaged one-run SE (``None`` when no run recorded it), in points."""
    ses = [s for s in (run_se(r, metric) for r in runs) if s is not None]
    return 100 * statistics.fmean(r[metric] for r in runs), (100 * statistics.fmean(ses) if ses else None)


def common_seeds(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """The runs of ``a`` and ``b`` with a seed both have (the base model, seed-free, pairs with every run)."""
    if b and b[0]["kind"] == "base":
        return list(a), list(b)
    seeds = {r["seed"] for r in a} & {r["seed"] for r in b}
    return [r for r in a if r["seed"] in seeds], [r for r in b if r["seed"] in seeds]


def difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], metric: str) -> tuple[float, float, str]:
    """``mean(a) − mean(b)`` in points over the seeds both have, the SE of that difference and which SE it
    is (paired / unpaired)."""
    all_a, all_b = a, b
    a, b = common_seeds(a, b)
    if not a:
        return math.nan, math.nan, "n/a"
    delta = summary(a, metric)[0] - summary(b, metric)[0]
    b_by_seed = {r["seed"]: r for r in b}
    base_b = b[0] if b and b[0]["kind"] == "base" else None
    paired = []
    for ra in a:
        rb = base_b or b_by_seed.get(ra["seed"])
        if rb and "per_question" in ra and "per_question" in rb:
            d = [x - y for x, y in zip(ra["per_question"][metric], rb["per_question"][metric], strict=True)]
            paired.append(statistics.stdev(d) / math.sqrt(len(d)))
    if paired:
        return delta, 100 * statistics.fmean(paired), "paired"
    se_a, se_b = summary(all_a, metric)[1], summary(all_b, metric)[1]  # a run's SE hardly depends on its seed
    if se_a is None or se_b is None:
        return delta, math.nan, "n/a"
    return delta, math.hypot(se_a, se_b), "unpaired"


def verdict(delta: float, se: float) -> str:
    if math.isnan(se) or math.isnan(delta):
        return "?"
    if abs(delta) <= se:
        return "tie"
    return "ahead" if delta > 0 else "behind"


def _cell(runs: Sequence[dict[str, Any]], metric: str) -> str:
    mean, se = summary(runs, metric)
    return f"{mean:.1f} ± {se:.1f}" if se is not None else f"{mean:.1f}"


def _per_seed(runs: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    if runs[0]["kind"] == "base":
        return "(no training)"
    return "; ".join(f"{r['seed']}: " + " / ".join(f"{100 * r[m]:.1f}" for m in metrics) for r in runs)


def _params(runs: Sequence[dict[str, Any]]) -> str:
    r = runs[0]
    if r["kind"] == "base":
        return "0"
    if r.get("computed_values"):
        values = sorted({x.get("computed_values", 0) for x in runs})
        return f"0 ({' / '.join(f'{v:,}' for v in values)} computed)"
    return f"{r['params']:,}"


def _choices(runs: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in runs:
        c = r.get("choice", {})
        if "heads" in c:
            parts.append(f"seed {r['seed']}: K = {c['heads']}, α = {c['alpha']:g}")
        elif "layers" in c:
            layers = c["layers"]
            where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            parts.append(f"seed {r['seed']}: {where}, α = {c['alpha']:g}")
    return "; ".join(parts)


def main_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    by = by_kind(rows)
    n = rows[0]["n"]
    table = [[KINDS[k], *(_cell(by[k], m) for m in metrics), _params(by[k]), _per_seed(by[k], metrics)]
             for k in KINDS if k in by]
    names = [METRIC_NAMES[m] for m in metrics]
    return markdown_table(["method", f"{names[0]} (test, n={n})", *(f"{name} (test)" for name in names[1:]),
                           "trainable params", "per seed: " + " / ".join(n.removesuffix(" %") for n in names)],
                          table)


def other_task(rows: Sequence[dict[str, Any]]) -> str:
    """The name of the task whose heads the ablation's (b) row used (read from its label)."""
    for r in rows:
        if r["kind"] == "lofit-other" and "selected for " in r["method"]:
            return r["method"].split("selected for ", 1)[1].removesuffix(")")
    return "the other task"


def claims_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    by = by_kind(rows)
    labels = {**KINDS, "lofit-random": "LoFiT 3% on random heads",
              "lofit-other": f"LoFiT 3% on {other_task(rows).split(' (')[0]}'s heads",
              "lofit3": "LoFiT 3%", "lofit10": "LoFiT 10%"}
    table = []
    for claim, a, b in CLAIMS:
        if a not in by or b not in by:
            continue
        cells = []
        kinds = set()
        for metric in metrics:
            delta, se, kind = difference(by[a], by[b], metric)
            kinds.add(kind)
            cells.append(f"{delta:+.1f} (no SE recorded)" if math.isnan(se) else
                         f"{delta:+.1f} ± {se:.1f} ({verdict(delta, se)})")
        seeds = sorted({r["seed"] for r in common_seeds(by[a], by[b])[0]})
        table.append([claim, f"{labels[a]} − {labels[b].split(' (')[0]}", *cells,
                      "/".join(sorted(kinds)), ", ".join(map(str, seeds))])
    names = [f"Δ {METRIC_NAMES[m].removesuffix(' %')} points (± SE)" for m in metrics]
    return markdown_table(["claim", "difference", *names, "SE", "seeds"], table)


def ablation_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS, task: str = "TruthfulQA") -> str:
    by = by_kind(rows)
    other = other_task(rows)
    table = [[label.format(task=task, other=other), *(_cell(by[k], m) for m in metrics), _per_seed(by[k], metrics)]
             for k, label in ABLATION.items() if k in by]
    if "base" in by:
        table.insert(0, ["base model (no offsets)", *(_cell(by["base"], m) for m in metrics), "-"])
    names = [METRIC_NAMES[m] for m in metrics]
    return markdown_table(["heads (3% = 8 of 270)", *(f"{name} (test)" for name in names),
                           "per seed: " + " / ".join(n.removesuffix(" %") for n in names)], table)


def search_table(rows: Sequence[dict[str, Any]], metric: str = "MC2") -> str:
    """ITI's and RepE's validation searches: ``metric`` % on the validation data for each setting, per seed."""
    by = by_kind(rows)
    table = []
    for kind, what in (("iti", "K = {} heads"), ("repe", "layer(s) {}")):
        for r in by.get(kind, []):
            for setting, scores in r.get("search", {}).items():
                cells = ", ".join(f"α {float(a):g}: {100 * v:.1f}" for a, v in scores.items())
                layers = setting.split("-")
                shown = setting if len(layers) < 2 else f"{layers[0]}-{layers[-1]}"
                table.append([KINDS[kind].split(" (")[0], str(r["seed"]), what.format(shown), cells])
    return markdown_table(["method", "seed", "setting", f"validation {metric} % by α"], table) if table else ""


def overlap(rows: Sequence[dict[str, Any]]) -> str:
    """How many heads each ablation condition shares with the task's own selection, per seed."""
    by = by_kind(rows)
    own = {r["seed"]: {tuple(h) for h in r.get("heads", [])} for r in by.get("lofit3", [])}
    parts = []
    for kind in ("lofit-other", "lofit-random"):
        for r in by.get(kind, []):
            if own.get(r["seed"]):
                shared = len(own[r["seed"]] & {tuple(h) for h in r["heads"]})
                parts.append(f"{ABLATION[kind][:3]} seed {r['seed']}: {shared} of {len(r['heads'])}")
    return "; ".join(parts)


def render(rows: Sequence[dict[str, Any]], headers: Sequence[dict[str, Any]],
           settings: Sequence[str] = ()) -> dict[str, str]:
    """The markdown of the ``truthfulqa`` and ``truthfulqa-ablation`` sections (``settings``: bullets listing
    the runs' settings, placed under the main table)."""
    by = by_kind(rows)
    machines = sorted({describe_machine(h["machine"]) for h in headers})
    files = ", ".join(f"`benchmarks/results/{h['file']}`" for h in headers)
    other_n = next((h["settings"]["ablation"]["other_max_train"] for h in headers if "ablation" in h["settings"]), "?")
    choices = [f"{KINDS[k].split(' (')[0]}: {_choices(by[k])}" for k in ("iti", "repe") if k in by]
    main = "\n".join([
        "### TruthfulQA fold 0, SmolLM2-135M-Instruct (full configuration)",
        "",
        main_table(rows),
        "",
        "Each cell: mean over the seeds ± the standard error of one run over the 409 test questions. "
        "Learning-free methods store computed values instead of trained parameters. Chosen on validation: "
        + ("; ".join(choices) or "-") + ".",
        "",
        "Validation searches (82 questions; the best MC2 is used on test):",
        "",
        search_table(rows),
        "",
        "#### The claims, difference by difference",
        "",
        claims_table(rows),
        "",
        "Each difference is taken over the seeds both methods have; within one standard error it is a tie. "
        "\"paired\": the SE of the per-question differences (same questions, same seed); \"unpaired\": "
        "sqrt(SE_a² + SE_b²) with the SEs of the cells above, used where a run kept no per-question scores.",
        "",
        "Settings (each run: `python benchmarks/lofit_truthfulqa.py --methods ... --set seed=S --json RUN.json`; "
        "the tables: `python benchmarks/lofit_truthfulqa.py --combine RUN.json ...`):",
        "",
        *settings,
        "",
        f"Runs: {files}.{replaced_note(headers)}",
        "",
        "Machines: " + " | ".join(machines),
    ])
    ablation = "\n".join([
        "### Localization ablation on TruthfulQA, SmolLM2-135M-Instruct (full configuration)",
        "",
        ablation_table(rows),
        "",
        "Same offsets training for every row (8 heads, 3 epochs, lr 0.03, DPO, the 326 training questions); only "
        f"the heads differ. (b)'s heads are LoFiT's step 1 run on {other_n} CLUTRR training examples (drawn with the "
        "seed, same step-1 settings). Heads shared with (a): " + (overlap(rows) or "-") + ".",
    ])
    return {"truthfulqa": main, "truthfulqa-ablation": ablation}


def render_exact_match(rows: Sequence[dict[str, Any]], task: str, n_val: int | str | None = None) -> dict[str, str]:
    """The over-seeds tables of an exact-match task (``lofit_exact_match.py --combine``): the main table, the
    claims and ITI's/RepE's validation searches (key ``"main"``), and the localization ablation (key
    ``"ablation"``, when the runs have it)."""
    by = by_kind(rows)
    choices = [f"{KINDS[k].split(' (')[0]}: {_choices(by[k])}" for k in ("iti", "repe") if k in by]
    searches = search_table(rows, "exact match")
    main = "\n".join([
        "Over the seeds (each cell: mean ± the standard error of one run over the test examples):",
        "",
        main_table(rows, ("em",)),
        "",
        *([f"Chosen on validation: {'; '.join(choices)}.", ""] if choices else []),
        *([f"Validation searches ({f'{n_val} examples; ' if n_val else ''}the best exact match is used on test):",
           "", searches, ""]
          if searches else []),
        claims_table(rows, ("em",)),
        "",
        "Each difference is taken over the seeds both methods have; within one standard error it is a tie "
        "(\"paired\": the SE of the per-example differences, same examples and seed).",
    ])
    out = {"main": main}
    if "lofit-random" in by or "lofit-other" in by:
        out["ablation"] = "\n".join([
            f"### Localization ablation on {task}, SmolLM2-135M-Instruct (full configuration)",
            "",
            ablation_table(rows, ("em",), task),
            "",
            "Same offsets training for every row (the LoFiT 3 % row's settings and data); only the heads differ. "
            "Heads shared with (a): " + (overlap(rows) or "-") + ".",
        ])
    return out
