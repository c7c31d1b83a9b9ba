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
* **ITI** and **RepE** (learning-free): contrast pairs from the training examples, ``prompt + " " +
  answer`` against ``prompt + " " + wrong answer`` (CLUTRR: another relation of the training set,
  drawn with the seed; MQuAKE: the answer *before* the edit), at most ``iti.train_examples`` of them
  (drawn with the seed). ITI probes every head on them and shifts the top K; RepE reads PCA vectors
  of the residual stream. (K, α) and (layers, α) are searched on the first ``val_examples``
  validation examples' exact match, never on test; both act at every token, generated ones too.

``python benchmarks/lofit_exact_match.py --task clutrr|mquake`` (the full configuration) or with
``--quick`` (64 train / 100 test examples). Results go into ``docs/lofit_results.md`` (section
``clutrr`` or ``mquake``) and, as JSON, to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import random
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
    lofit_ablation_run,
    lofit_runs,
    log,
    result_line,
    search_iti,
    search_repe,
    setup_threads,
    trainer_overrides,
)

import reftlib
from reftlib.evaluation import load_clutrr, load_mquake
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
        # learning-free baselines: contrast pairs from the training examples, grids searched on validation
        "val_examples": 20 if quick else 100,  # the first N validation examples (MQuAKE has 95)
        "iti": {"train_examples": 64 if quick else 1000, "heads": [8, 27], "alphas": [2.5, 5, 10, 20, 40],
                "val_fraction": 0.2},
        "repe": {"train_examples": 64 if quick else 1000, "layer_sets": [[15], list(range(10, 20))],
                 "alphas": [4, 16, 64, 256], "method": "pca"},
        # the localization ablation: LoFiT's offsets (3 % of heads, same settings) on random heads and on the heads
        # step 1 selects for another task (with this run's step-1 settings; None = all its training examples)
        "ablation": {"fraction": 0.03, "other_task": "truthfulqa", "other_max_train": 64 if quick else None},
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
                        "heads": [tuple(h) for h in out["heads"]["selected"]],
                        **scores_of(args.task, out["metrics"], out["per_example"], out["timing"]["eval_s"], rows)})
        log(result_line(results[-1]))
    return results


def run_ablation(task, settings, args, condition: str, tokenizer, rows) -> dict[str, Any]:
    """LoFiT's offsets on random heads or on the other task's heads (``lofit_truthfulqa.lofit_ablation_run``)."""
    out, row = lofit_ablation_run(task, settings, args, condition, tokenizer, settings["train_examples"],
                                  settings["eval_examples"])
    return {**row, **scores_of(task, out["metrics"], out["per_example"], out["timing"]["eval_s"], rows)}


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


def contrast_texts(task: str, data_dir: Path, limit: int, seed: int) -> tuple[list[str], list[str]]:
    """ITI's and RepE's two classes: ``prompt + " " + answer`` and ``prompt + " " + wrong answer`` for up to
    ``limit`` training examples drawn with ``seed`` (CLUTRR: the wrong answer is another relation of the
    training set, drawn with the seed; MQuAKE: the answer before the edit)."""
    rng = random.Random(seed)
    if task == "clutrr":
        rows = load_clutrr("train", data_dir)
        relations = sorted({r.target for r in rows})
        pairs = [(r.prompt, r.target, rng.choice([x for x in relations if x != r.target])) for r in rows]
    else:
        rows = load_mquake("train", data_dir)
        pairs = [(r.prompt, r.answer, r.original_answer) for r in rows
                 if r.original_answer and r.original_answer.lower() != r.answer.lower()]
    if limit < len(pairs):
        pairs = rng.sample(pairs, limit)
    return [f"{p} {a}" for p, a, _ in pairs], [f"{p} {b}" for p, _, b in pairs]


def run_learning_free(method: str, task: str, tokenizer, data_dir: Path, val_rows, rows, settings) -> dict[str, Any]:
    """ITI or RepE (``method``) with its grid searched on ``val_rows``' exact match, evaluated on ``rows``."""
    pos, neg = contrast_texts(task, data_dir, settings[method]["train_examples"], settings["seed"])

    def score(model):
        return evaluate_task(task, model, tokenizer, val_rows, max_new_tokens=settings["max_new_tokens"],
                             progress=False)["metrics"]["exact_match"]["value"]

    if method == "iti":  # a positive and its negative share a prompt: keep them in the same probe split
        pairs = [*range(len(pos)), *range(len(neg))]
        reft_model, row = search_iti(tokenizer, pos, neg, pairs, score, None, settings)
    else:
        reft_model, row = search_repe(tokenizer, pos, neg, score, None, settings)
    return {**row, "val_n": len(val_rows), **evaluate(task, reft_model, tokenizer, rows, settings)}


def trained_settings(s: dict[str, Any], results, args) -> list[str]:
    """The settings lines of LoFiT, LoReFT and LoRA (those the run has; LoFiT also for the ablation's rows)."""
    labels = {r["method"].split(" ")[0] for r in results}
    lines = []
    if "LoFiT" in labels:
        shared = "one run, shared by both K" if len(s["lofit"]["fractions"]) > 1 else "one run"
        lines.append(f"* LoFiT: head selection {epochs_text(s['select']['epochs'])}, lr {s['select']['lr']}, "
                     f"L1 λ={s['select']['l1']} ({shared}); offsets {epochs_text(s['lofit']['epochs'])}, "
                     f"lr {s['lofit']['lr']} (`reftlib.lofit.run_lofit_task`, as `reftlib lofit {args.task}`).")
    if "LoReFT" in labels:
        lines.append(f"* LoReFT: rank {s['loreft']['rank']}, layer {s['loreft']['layer']} `block_output`, last prompt "
                     f"token, {epochs_text(s['loreft']['epochs'])}, lr {s['loreft']['lr']}.")
    if "LoRA" in labels:
        lines.append(f"* LoRA (PEFT): r={s['lora']['r']}, alpha={s['lora']['alpha']}, {', '.join(s['lora']['targets'])}, "
                     f"{epochs_text(s['lora']['epochs'])}, lr {s['lora']['lr']} (`transformers.Trainer`, the model's "
                     "causal-LM loss).")
    return lines


def extra_settings(s: dict[str, Any], results, args) -> list[str]:
    """The settings lines of ITI, RepE and the ablation (those the run has)."""
    kinds = {r["method"].split(" ")[0] for r in results} | {"ablation" for r in results if "ablation" in r}
    wrong = {"clutrr": "another relation of the training set (drawn with the seed)",
             "mquake": "the answer before the edit"}[args.task]
    val_n = sorted({r["val_n"] for r in results if "val_n" in r}) or [s["val_examples"]]
    val = f"the first {' / '.join(map(str, val_n))} validation examples' exact match"
    lines = []
    if "ITI" in kinds:
        lines.append(f"* ITI: probes on every head's last-token output of up to {s['iti']['train_examples']} training "
                     f"examples (drawn with the seed), prompt + answer (positive) vs prompt + {wrong} (negative), "
                     f"split {round(100 * (1 - s['iti']['val_fraction']))} / {round(100 * s['iti']['val_fraction'])} "
                     f"for ranking heads; K ∈ {s['iti']['heads']} × α ∈ {s['iti']['alphas']} (α·σ·θ mass-mean shift "
                     f"at every token) searched on {val}.")
    if "RepE" in kinds:
        sets = " and ".join(f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in s["repe"]["layer_sets"])
        lines.append(f"* RepE: {s['repe']['method']} reading vectors (unit length) of the residual stream "
                     f"(`block_output`, last token) from the same contrast pairs (up to {s['repe']['train_examples']}); "
                     f"α·v at every token; layers {sets} × α ∈ {s['repe']['alphas']} searched on {val}.")
    if "ablation" in kinds:
        a = s["ablation"]
        other = get_task_spec(a["other_task"]).title
        lines.append(f"* Localization ablation: LoFiT's offsets ({round(100 * a['fraction'])}% of heads, the LoFiT "
                     f"row's settings) on random heads drawn with the seed, and on the heads step 1 selects for "
                     f"{other} ({'all' if a['other_max_train'] is None else a['other_max_train']} training examples, "
                     "the same step-1 settings, that task's loss).")
    return lines


def epochs_text(n: int) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} epoch{'s' if n != 1 else ''}"


TRAINED = ("lofit", "loreft", "lora")  # the settings keys of the trained methods


def epochs_note(settings: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``", 1 epoch per trained method"`` when the trained methods all ran a number of epochs other than their
    defaults (the heading then tells such a table from one with the defaults), else ``""``."""
    epochs = {settings[m]["epochs"] for m in TRAINED}
    if len(epochs) != 1 or all(settings[m]["epochs"] == defaults[m]["epochs"] for m in TRAINED):
        return ""
    return f", {epochs_text(epochs.pop())} per trained method"


def report(results, settings, info, args, settings_from=None) -> str:
    """The run's table (``results``, with wall times) and the settings of every method in ``settings_from``
    (default: ``results``)."""
    base = results[0]
    spec = get_task_spec(args.task)
    rows = []
    for r in results:
        delta = "" if r is base else f" ({100 * (r['accuracy'] - base['accuracy']):+.1f})"
        se = f" ± {100 * r['accuracy_se']:.1f}" if r.get("accuracy_se") is not None else ""
        train = "-" if r is base else f"{r['train_s'] / 60:.1f} min"
        if r.get("select_s") and "ablation" not in r:
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
        f"### {spec.title}, SmolLM2-135M-Instruct ({'quick run' if args.quick else 'full configuration'}"
        f"{epochs_note(s, default_settings(args.task, args.quick))})",
        "",
        table,
        "",
        f"Machine: {describe_machine(info)}",
        "",
        f"Settings (`{command_line('lofit_exact_match.py', args)}`):",
        "",
        f"* Training data: {s['n_train']} {what[0]} ({subset}), supervised cross-entropy on {what[1]} + EOS for "
        f"every method; batch {s['batch_size']}, AdamW, linear decay, no weight decay, seed {s['seed']}.",
        *trained_settings(s, settings_from or results, args),
        *extra_settings(s, settings_from or results, args),
        f"* Evaluation: greedy generation (≤ {s['max_new_tokens']} new tokens), first line, stripped, "
        f"case-insensitive exact match against {what[2]} on {base['n']} {args.eval_split} examples; ± one standard "
        "error over the examples." + (" The third column also accepts the answer followed by a period."
                                      if args.task == "clutrr" else ""),
    ])


def overrides_of(settings: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """The ``--set KEY=JSON`` options that turn ``defaults`` into a run's ``settings`` (its command line)."""
    out = []
    for key, default in defaults.items():
        if key not in settings or key in ("device", "dtype"):
            continue
        if isinstance(default, dict) and isinstance(settings[key], dict):
            out += overrides_of(settings[key], default, f"{prefix}{key}.")
        elif settings[key] != default:
            out.append(f"{prefix}{key}={json.dumps(settings[key])}")
    return out


def combine(args) -> None:
    """``--combine``: the sections for ``args.task`` from saved runs (the first one's table, with its wall times,
    then every run's methods over the seeds, the claims and, when run, the localization ablation)."""
    from lofit_tables import load_runs, render_exact_match, replaced_note

    first = json.loads(Path(args.combine[0]).read_text())
    if first.get("task") != args.task:
        sys.exit(f"{args.combine[0]} is not a {args.task} run")
    quick = first["settings"]["train_examples"] == 64
    run_args = argparse.Namespace(**{**vars(args), "quick": quick,
                                     "set": overrides_of(first["settings"], default_settings(args.task, quick))})
    rows, headers = load_runs(args.combine)
    if any(h["task"] != args.task for h in headers):
        sys.exit(f"--combine: every file must be a {args.task} run")
    settings: dict[str, Any] = {}
    for h in reversed(headers):  # every run's settings, the first run's where they overlap
        settings.update(h["settings"])
    unrecorded = [r for r in rows if r["kind"] in ("iti", "repe") and "val_n" not in r]
    if unrecorded:  # runs that did not record how many validation examples their search scored: count them
        n = len(load_task_data(args.task, args.data_dir, eval_split="val", max_eval=settings["val_examples"]).eval_rows)
        for r in unrecorded:
            r["val_n"] = n
    val_n = sorted({r["val_n"] for r in rows if "val_n" in r})
    sections = render_exact_match(rows, get_task_spec(args.task).title, n_val=" / ".join(map(str, val_n)) or None)
    files = ", ".join(f"`benchmarks/results/{h['file']}`" for h in headers)
    text = "\n\n".join([report(first["results"], settings, first["machine"], run_args, settings_from=rows),
                         sections["main"], f"Runs: {files}.{replaced_note(headers)}"])
    section = args.section or args.task
    print(text)
    if not args.no_write:
        replace_section(RESULTS, section, text)
    if "ablation" in sections:
        print(sections["ablation"])
        if not args.no_write:
            replace_section(RESULTS, f"{section}-ablation", sections["ablation"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["clutrr", "mquake"], required=True)
    parser.add_argument("--quick", action="store_true", help="64 train examples, 100 eval examples")
    parser.add_argument("--eval-split", choices=["val", "test"], default="test")
    parser.add_argument("--methods", default="base,lofit,loreft,lora,iti,repe",
                        help="comma-separated subset of base, lofit, loreft, lora, iti, repe, lofit-random, "
                             "lofit-other (the last two: the localization ablation)")
    add_run_arguments(parser, "clutrr/ and mquake/")
    parser.add_argument("--combine", nargs="+", default=None, metavar="RUN.json",
                        help="run nothing: the first run's table (all methods), then every run's methods over the "
                             "seeds, from these --json files")
    parser.add_argument("--section", default=None,
                        help="with --combine: the docs section to write (default: the task's name; the ablation "
                             "goes to SECTION-ablation), e.g. for runs with other epochs than the main table's")
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

    def val_rows():
        return load_task_data(args.task, data.data_dir, eval_split="val", max_eval=settings["val_examples"]).eval_rows

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
        "lofit-random": lambda: [run_ablation(args.task, settings, args, "random", tokenizer, eval_rows)],
        "lofit-other": lambda: [run_ablation(args.task, settings, args, "other", tokenizer, eval_rows)],
        "iti": lambda: [run_learning_free("iti", args.task, tokenizer, data.data_dir, val_rows(), eval_rows, settings)],
        "repe": lambda: [run_learning_free("repe", args.task, tokenizer, data.data_dir, val_rows(), eval_rows,
                                           settings)],
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
