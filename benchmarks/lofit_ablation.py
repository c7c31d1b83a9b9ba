"""LoFiT's localization ablation on TruthfulQA and CLUTRR with SmolLM2-135M-Instruct.

Offsets are trained (LoFiT step 2, same settings every time) on three sets of heads of the same size:

* **(a) task heads**: the heads LoFiT's step 1 selects for this task;
* **(b) other task's heads**: the heads step 1 selected for the other task (TruthfulQA <-> CLUTRR),
  same seed;
* **(c) random heads**: as many heads drawn uniformly at random with the seed.

If localization matters, (a) beats (b) and (c). Every run is one
:func:`reftlib.lofit.run_lofit_task` call (what ``reftlib lofit TASK [--heads-from DIR | --random-heads]``
runs), repeated for each seed; the base model is scored once per task.

``python benchmarks/lofit_ablation.py`` runs the full configuration (TruthfulQA: all 326 train / 409
test questions; CLUTRR: 512 train / 450 test examples, the settings of ``lofit_truthfulqa.py`` and
``lofit_exact_match.py``; seeds 42 and 43: many hours on a CPU, use ``--device cuda``). ``--quick`` runs a
small configuration (16 training examples, 24 test examples per task, 1 + 2 epochs). The table goes
into ``docs/lofit_results.md`` (section ``ablation``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, load_average, machine_info, markdown_table, replace_section
from lofit_truthfulqa import RESULTS, log, setup_threads

from reftlib.lofit import run_lofit_task

TASK_NAMES = {"truthfulqa": "TruthfulQA", "clutrr": "CLUTRR"}
OTHER = {"truthfulqa": "clutrr", "clutrr": "truthfulqa"}
CONDITIONS = {"a": "(a) heads selected for the task", "b": "(b) heads selected for the other task",
              "c": "(c) random heads (same count)"}


def default_settings(quick: bool) -> dict[str, Any]:
    """Every setting of the run; the rest are each task's defaults (reftlib.lofit.get_task_spec)."""
    common = {"heads": 0.03, "seeds": [42, 43]}
    if quick:
        limits = {"truthfulqa": {"max_train": 16, "max_eval": 24}, "clutrr": {"max_train": 16, "max_eval": 24}}
        return {**common, "limits": limits, "select_epochs": 1, "epochs": 2}
    limits = {"truthfulqa": {"max_train": None, "max_eval": None}, "clutrr": {"max_train": 512, "max_eval": None}}
    return {**common, "limits": limits, "select_epochs": None, "epochs": None}


def run(args, settings: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Every (task, condition, seed) run, base-model scores in the first (a) run of each task."""
    results = []
    common = dict(model=args.model, data_dir=args.data_dir, heads=settings["heads"], device=args.device,
                  select_epochs=settings["select_epochs"], epochs=settings["epochs"], progress=False, plot=False)
    for i, seed in enumerate(settings["seeds"]):
        folders = {}
        for cond in ("a", "b", "c"):
            for task in TASK_NAMES:
                extra: dict[str, Any] = {}
                if cond == "b":
                    extra["heads_from"] = folders[OTHER[task]]
                elif cond == "c":
                    extra["random_heads"] = True
                folder = workdir / f"{task}-{cond}-seed{seed}"
                out = run_lofit_task(task, seed=seed, output_dir=folder, eval_base=(cond == "a" and i == 0),
                                     **settings["limits"][task], **common, **extra)
                if cond == "a":
                    folders[task] = folder
                out.pop("per_example")
                results.append({"task": task, "condition": cond, "seed": seed, **out})
                log(f"{cond} seed {seed}: {json.dumps({k: v['value'] for k, v in out['metrics'].items()})} "
                    f"heads {out['heads']['selected']} in {out['timing']['total_s']:.0f}s")
    return results


def _cell(runs: Sequence[dict[str, Any]], metric: str) -> str:
    values = [100 * r["metrics"][metric]["value"] for r in runs]
    mean = sum(values) / len(values)
    return f"{mean:.1f} ({' / '.join(f'{v:.1f}' for v in values)})"


def report(results: Sequence[dict[str, Any]], settings: dict[str, Any], info: dict[str, Any], args) -> str:
    metrics = [("truthfulqa", "mc1", "TruthfulQA MC1 %"), ("truthfulqa", "mc2", "TruthfulQA MC2 %"),
               ("clutrr", "exact_match", "CLUTRR exact match %")]
    first = {task: next(r for r in results if r["task"] == task and "base_metrics" in r) for task in TASK_NAMES}
    rows = [["base model (no offsets)"] + [f"{100 * first[t]['base_metrics'][m]['value']:.1f}" for t, m, _ in metrics]]
    for cond, label in CONDITIONS.items():
        rows.append([label] + [_cell([r for r in results if r["task"] == t and r["condition"] == cond], m)
                               for t, m, _ in metrics])
    seeds = settings["seeds"]
    se = {t: max(r["metrics"][m]["stderr"] for r in results if r["task"] == t for m in r["metrics"])
          for t in TASK_NAMES}
    k = first["truthfulqa"]["heads"]["k"]
    heads = {(r["task"], r["seed"]): r["heads"]["selected"] for r in results if r["condition"] == "a"}
    overlap = [len({tuple(h) for h in heads[("truthfulqa", s)]} & {tuple(h) for h in heads[("clutrr", s)]})
               for s in seeds]
    n = {t: (first[t]["data"]["n_train"], first[t]["n_eval"]) for t in TASK_NAMES}
    cmd = "python benchmarks/lofit_ablation.py" + (" --quick" if args.quick else "")
    return "\n".join([
        f"### Localization ablation, SmolLM2-135M-Instruct{' (quick configuration)' if args.quick else ''}",
        "",
        markdown_table([f"heads (3% = {k} of {first['truthfulqa']['heads']['total']})"] + [name for _, _, name in metrics], rows),
        "",
        f"Each cell: mean over seeds {', '.join(map(str, seeds))} (each seed's value in parentheses). "
        f"One run's standard error is up to {100 * se['truthfulqa']:.1f} points on TruthfulQA and "
        f"{100 * se['clutrr']:.1f} on CLUTRR. The heads selected for the two tasks share "
        f"{' and '.join(map(str, overlap))} of {k} heads (seed {' and '.join(map(str, seeds))}).",
        "",
        f"Machine: {describe_machine(info)}",
        "",
        f"Configuration (`{cmd}`): TruthfulQA {n['truthfulqa'][0]} train questions (one DPO pair each) and "
        f"{n['truthfulqa'][1]} test questions; CLUTRR {n['clutrr'][0]} train and {n['clutrr'][1]} test examples; "
        f"head selection {settings['select_epochs'] or 2} epoch(s), offsets {settings['epochs'] or 3} epoch(s), "
        "the other settings are each task's defaults (`reftlib.lofit.get_task_spec`). Full configuration: "
        "`python benchmarks/lofit_ablation.py` (all TruthfulQA questions, 512 CLUTRR training examples, "
        "all test examples, the default epochs).",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 train / 24 test examples per task, 1 + 2 epochs")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 42,43)")
    parser.add_argument("--model", default=None, help="a local model folder (default: offline SmolLM2)")
    parser.add_argument("--data-dir", default=None, help="folder with truthfulqa/ and clutrr/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: see lofit_truthfulqa)")
    parser.add_argument("--output-dir", default=None, help="keep every run's folder here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/lofit_results.md")
    args = parser.parse_args(argv)

    threads = setup_threads(args.threads)
    settings = default_settings(args.quick)
    if args.seeds:
        settings["seeds"] = [int(s) for s in args.seeds.split(",")]
    info = machine_info(torch.device(args.device))
    log(f"{threads} thread(s), settings {settings}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.output_dir) if args.output_dir else Path(tmp)
        results = run(args, settings, workdir)
    info["load_end"] = load_average()
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "machine": info, "results": results},
                                              indent=1, default=str))
    text = report(results, settings, info, args)
    print(text)
    if not args.no_write:
        replace_section(RESULTS, "ablation", text)


if __name__ == "__main__":
    main()
