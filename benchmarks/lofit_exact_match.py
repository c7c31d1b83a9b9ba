"""LoFiT on the exact-match tasks, CLUTRR and MQuAKE, with SmolLM2-135M-Instruct: base model vs LoFiT
(3 %, 10 % of heads), LoReFT, LoRA.

Every method is trained with the same supervised objective, next-token cross-entropy on the
answer (``" " + answer`` followed by EOS; labels ``-100`` on the prompt), on the same examples of
the task's *train* split, and evaluated by exact match of the greedy answer
(:func:`reftlib.lofit.evaluate_task`: text up to the first newline, stripped, case-insensitive as
in LoFiT's scripts; MQuAKE also accepts the answer's aliases) on the *test* split (``--eval-split
val`` for tuning). The examples are :func:`reftlib.lofit.load_task_data`'s, what ``reftlib lofit
TASK`` trains on:

* **CLUTRR**: ``(story + question, " " + relation)``; all 3,151 training examples, 450 test examples.
* **MQuAKE-CF**: ``(edit + first question, " " + new answer)``; all 134 training cases, 864 test cases.

Methods:

* **LoFiT**: :func:`reftlib.lofit.run_lofit_task` (what ``reftlib lofit TASK`` runs):
  :func:`reftlib.lofit.select_heads` once (cross-entropy + L1), then :func:`reftlib.lofit.tune_offsets`
  on the top 3 % and 10 % heads; evaluated with the offsets at every token, also generated ones.
* **LoReFT**: rank 4 at ``block_output`` of layer 15, last prompt token, trained with
  :class:`reftlib.training.ReftTrainerForCausalLM`; generation intervenes on the prompt's last token.
* **LoRA**: PEFT ``r=8, alpha=16`` on ``q_proj``/``v_proj``, trained with ``transformers.Trainer``
  on the same tokenized examples (the model's own causal-LM loss: the same cross-entropy).

``python benchmarks/lofit_exact_match.py --task clutrr|mquake`` (the full configuration) or with
``--quick`` (64 train / 100 test examples). Results go into ``docs/lofit_results.md`` (section
``clutrr`` or ``mquake``) and, as JSON, to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, load_average, machine_info, markdown_table, replace_section
from lofit_truthfulqa import (
    RESULTS,
    add_run_arguments,
    apply_overrides,
    base_model,
    command_line,
    count_trainable,
    head_dim,
    lofit_runs,
    log,
    result_line,
    setup_threads,
    trainer_overrides,
)

import reftlib
from reftlib.lofit import evaluate_task, get_task_spec, load_task_data, make_sft_dataset
from reftlib.lofit._fit import training_arguments
from reftlib.offline import load_default_model
from reftlib.training import ReftDataCollator, ReftTrainerForCausalLM


def default_settings(task: str, quick: bool) -> dict[str, Any]:
    """Every hyperparameter of the run (the task's defaults, ``reftlib.lofit.get_task_spec``)."""
    spec = get_task_spec(task)
    return {
        "train_examples": 64 if quick else None,  # None = all (CLUTRR 3,151, MQuAKE 134)
        "eval_examples": 100 if quick else None,  # None = all (CLUTRR 450, MQuAKE 864 test)
        "batch_size": 8,
        "max_new_tokens": spec.max_new_tokens,
        "select": {"epochs": spec.select_epochs, "lr": spec.select_lr, "l1": spec.l1},
        "lofit": {"epochs": spec.epochs, "lr": spec.lr, "fractions": [0.03, 0.10]},  # not tuned: the paper's upper end
        "loreft": {"epochs": 3, "lr": 1e-2, "rank": 4, "layer": 15},
        "lora": {"epochs": 3, "lr": 5e-4, "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        "seed": 42,
        "device": "cpu",  # --device / --dtype
        "dtype": "fp32",
    }


def references(task: str, row: Any) -> list[str]:
    """The answers a prediction may match (MQuAKE: the new answer and its aliases)."""
    return [row.answer, *row.aliases] if task == "mquake" else [row.target]


def evaluate(task: str, model: Any, tokenizer, rows, settings) -> dict[str, Any]:
    out = evaluate_task(task, model, tokenizer, rows, max_new_tokens=settings["max_new_tokens"], progress=False)
    return scores_of(task, out["metrics"], out["per_example"], out["eval_s"], rows)


def scores_of(task: str, metrics, per_example, eval_s, rows) -> dict[str, Any]:
    """The table's columns from :func:`reftlib.lofit.evaluate_task`'s output (``lenient``: a final period allowed),
    with the standard error and each example's result (for paired comparisons)."""
    predictions = [e["prediction"] for e in per_example]
    lenient = [bool(e["correct"]) or p.rstrip(".").strip().lower() in {a.lower() for a in references(task, r)}
               for e, p, r in zip(per_example, predictions, rows)]
    return {"accuracy": metrics["exact_match"]["value"], "accuracy_se": metrics["exact_match"]["stderr"],
            "lenient": sum(lenient) / len(lenient), "n": metrics["exact_match"]["n"], "eval_s": eval_s,
            "per_example": [bool(e["correct"]) for e in per_example],
            "examples": list(zip(predictions[:5], [references(task, r)[0] for r in rows[:5]]))}


def train(trainer_cls, model, tokenizer, dataset, cfg, settings, quiet) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, lr=cfg["lr"], epochs=cfg["epochs"], batch_size=settings["batch_size"],
                                  seed=settings["seed"], overrides=quiet)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset,
                              data_collator=ReftDataCollator(tokenizer=tokenizer))
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def run_lofit(rows, settings, args) -> list[dict[str, Any]]:
    """LoFiT with :func:`reftlib.lofit.run_lofit_task` (what ``reftlib lofit TASK`` runs), both K."""
    model, _ = load_default_model()
    results = []
    for out, chosen in lofit_runs(args.task, settings, args, settings["train_examples"], settings["eval_examples"]):
        select_s = results[0]["select_s"] if results else out["timing"]["select_s"]
        results.append({"method": f"LoFiT ({round(out['heads']['fraction'] * 100)}% = {chosen.k} heads)",
                        "params": out["trainable_parameters"], "train_s": out["timing"]["offsets_s"] + select_s,
                        "select_s": select_s, "selection_params": chosen.scores.numel() * head_dim(model),
                        **scores_of(args.task, out["metrics"], out["per_example"], out["timing"]["eval_s"], rows)})
        log(result_line(results[-1]))
    return results


def run_loreft(task, tokenizer, pairs, rows, settings, quiet) -> dict[str, Any]:
    model = base_model(settings)
    cfg = settings["loreft"]
    torch.manual_seed(settings["seed"])
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([{
        "layer": cfg["layer"], "component": "block_output", "positions": "l1",
        "intervention": reftlib.LoreftIntervention(low_rank_dimension=cfg["rank"])}]))
    dataset = make_sft_dataset(tokenizer, pairs, positions="l1", model=model)
    train_s = train(ReftTrainerForCausalLM, reft_model, tokenizer, dataset, cfg, settings, quiet)
    reft_model.eval()
    return {"method": f"LoReFT (rank {cfg['rank']}, layer {cfg['layer']}, last prompt token)",
            "params": reft_model.count_parameters(), "train_s": train_s,
            **evaluate(task, reft_model, tokenizer, rows, settings)}


def run_lora(task, tokenizer, pairs, rows, settings, quiet) -> dict[str, Any]:
    import peft

    model = base_model(settings)
    cfg = settings["lora"]
    torch.manual_seed(settings["seed"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                                                      target_modules=list(cfg["targets"])))
    dataset = make_sft_dataset(tokenizer, pairs, model=model)
    train_s = train(Trainer, lora, tokenizer, dataset, cfg, settings, quiet)
    lora.eval()
    return {"method": f"LoRA (r={cfg['r']}, {'/'.join(cfg['targets'])})", "params": count_trainable(lora),
            "train_s": train_s, **evaluate(task, lora, tokenizer, rows, settings)}


def report(results, settings, info, args) -> str:
    base = results[0]
    spec = get_task_spec(args.task)
    rows = []
    for r in results:
        delta = "" if r is base else f" ({100 * (r['accuracy'] - base['accuracy']):+.1f})"
        se = f" ± {100 * r['accuracy_se']:.1f}" if r.get("accuracy_se") is not None else ""
        train = "-" if r is base else f"{r['train_s'] / 60:.1f} min"
        if "select_s" in r:
            train += f" (incl. {r['select_s'] / 60:.1f} min shared head selection)"
        lenient = [f"{100 * r['lenient']:.1f}"] if args.task == "clutrr" else []
        rows.append([r["method"], f"{100 * r['accuracy']:.1f}{se}{delta}", *lenient,
                     "0" if r is base else f"{r['params']:,}", train, f"{r['eval_s'] / 60:.1f} min"])
    s = settings
    # CLUTRR's base model ends its answers with a period: a second column also accepts that
    table = markdown_table(["method", f"exact match % ({args.eval_split}, n={base['n']}) ± SE",
                            *(["ignoring a final period %"] if args.task == "clutrr" else []), "trainable params",
                            "train wall time", "eval wall time"], rows)
    what = {"clutrr": ("CLUTRR train examples", "`\" \" + relation`", "the relation"),
            "mquake": ("MQuAKE-CF train cases (the requested edit + the first question)", "`\" \" + new answer`",
                       "the new answer or one of its aliases")}[args.task]
    subset = "all" if s["train_examples"] is None else f"drawn with seed {s['seed']}"
    return "\n".join([
        f"### {spec.title}, SmolLM2-135M-Instruct{' (quick run)' if args.quick else ' (full configuration)'}",
        "",
        table,
        "",
        f"Machine: {describe_machine(info)}",
        "",
        f"Settings (`{command_line('lofit_exact_match.py', args)}`):",
        "",
        f"* Training data: {s['n_train']} {what[0]} ({subset}), supervised cross-entropy on {what[1]} + EOS for "
        f"every method; batch {s['batch_size']}, AdamW, linear decay, no weight decay, seed {s['seed']}.",
        f"* LoFiT: head selection {s['select']['epochs']} epochs, lr {s['select']['lr']}, L1 λ={s['select']['l1']} "
        f"(one run, shared by both K); offsets {s['lofit']['epochs']} epochs, lr {s['lofit']['lr']} "
        f"(`reftlib.lofit.run_lofit_task`, as `reftlib lofit {args.task}`).",
        f"* LoReFT: rank {s['loreft']['rank']}, layer {s['loreft']['layer']} `block_output`, last prompt token, "
        f"{s['loreft']['epochs']} epochs, lr {s['loreft']['lr']}.",
        f"* LoRA (PEFT): r={s['lora']['r']}, alpha={s['lora']['alpha']}, {', '.join(s['lora']['targets'])}, "
        f"{s['lora']['epochs']} epochs, lr {s['lora']['lr']} (`transformers.Trainer`, the model's causal-LM loss).",
        f"* Evaluation: greedy generation (≤ {s['max_new_tokens']} new tokens), first line, stripped, "
        f"case-insensitive exact match against {what[2]} on {base['n']} {args.eval_split} examples; ± one standard "
        "error over the examples." + (" The third column also accepts the answer followed by a period."
                                      if args.task == "clutrr" else ""),
    ])


def combine(args) -> None:
    """``--combine``: the section for ``args.task`` from saved runs (the first one has every method)."""
    from lofit_tables import load_runs, render_exact_match

    first = json.loads(Path(args.combine[0]).read_text())
    if first.get("task") != args.task:
        sys.exit(f"{args.combine[0]} is not a {args.task} run")
    run_args = argparse.Namespace(**{**vars(args), "quick": first["settings"]["train_examples"] == 64})
    rows, _ = load_runs(args.combine)
    text = report(first["results"], first["settings"], first["machine"], run_args) + "\n\n" + render_exact_match(rows)
    print(text)
    if not args.no_write:
        replace_section(RESULTS, args.task, text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["clutrr", "mquake"], required=True)
    parser.add_argument("--quick", action="store_true", help="64 train examples, 100 eval examples")
    parser.add_argument("--eval-split", choices=["val", "test"], default="test")
    parser.add_argument("--methods", default="base,lofit,loreft,lora", help="comma-separated subset")
    add_run_arguments(parser, "clutrr/ and mquake/")
    parser.add_argument("--combine", nargs="+", default=None, metavar="RUN.json",
                        help="run nothing: the first run's table (all methods), then every run's methods over the "
                             "seeds, from these --json files")
    args = parser.parse_args(argv)
    if args.combine:
        combine(args)
        return

    threads = setup_threads(args.threads)
    settings = apply_overrides(default_settings(args.task, args.quick), args.set)
    settings.update(device=args.device, dtype=args.dtype)
    try:
        data = load_task_data(args.task, args.data_dir, eval_split=args.eval_split, max_train=settings["train_examples"],
                              max_eval=settings["eval_examples"], seed=settings["seed"])
    except reftlib.ReftError as exc:
        sys.exit(f"{get_task_spec(args.task).title} data not found, skipping the benchmark: {exc}")
    pairs, eval_rows = data.train, data.eval_rows
    settings["n_train"] = len(pairs)
    quiet = trainer_overrides(settings)
    info = machine_info(torch.device(settings["device"]))
    _, tokenizer = load_default_model()
    methods = args.methods.split(",")
    log(f"{len(pairs)} training examples, {len(eval_rows)} {args.eval_split} examples, {threads} thread(s), "
        f"settings {settings}")
    runs: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "base": lambda: [{"method": "base model", "params": 0, "train_s": 0.0,
                          **evaluate(args.task, base_model(settings), tokenizer, eval_rows, settings)}],
        "lofit": lambda: run_lofit(eval_rows, settings, args),
        "loreft": lambda: [run_loreft(args.task, tokenizer, pairs, eval_rows, settings, quiet)],
        "lora": lambda: [run_lora(args.task, tokenizer, pairs, eval_rows, settings, quiet)],
    }
    unknown = sorted(set(methods) - set(runs))
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {', '.join(runs)}")
    results: list[dict[str, Any]] = []
    for name, run in runs.items():
        if name in methods:
            for result in run():
                results.append(result)
                log(result_line(result))
    info["load_end"] = load_average()
    for r in results:
        r["seed"] = settings["seed"]
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "settings": settings, "machine": info,
                                               "results": results}, indent=1, default=str))
    if results and results[0]["method"] == "base model" and len(results) > 1:
        text = report(results, settings, info, args)
        print(text)
        if not args.no_write:
            replace_section(RESULTS, args.task, text)


if __name__ == "__main__":
    main()
