"""LoFiT on CLUTRR with SmolLM2-135M-Instruct: base model vs LoFiT (3 %, 10 % of heads), LoReFT, LoRA.

Every method is trained with the same supervised objective, next-token cross-entropy on the
answer (``" " + relation`` followed by EOS; labels ``-100`` on the prompt), on the same subset
of the CLUTRR *train* split (drawn with a fixed seed), and evaluated by exact match of the greedy
answer (:func:`reftlib.evaluation.exact_match_generate`: text up to the first newline, stripped,
case-insensitive as in LoFiT's scripts) on the *test* split (``--eval-split val`` for tuning).

* **LoFiT**: :func:`reftlib.lofit.run_lofit_task` (what ``reftlib lofit clutrr`` runs):
  :func:`reftlib.lofit.select_heads` once (cross-entropy + L1), then :func:`reftlib.lofit.tune_offsets`
  on the top 3 % and 10 % heads; evaluated with the offsets at every token, also generated ones.
* **LoReFT**: rank 4 at ``block_output`` of layer 15, last prompt token, trained with
  :class:`reftlib.training.ReftTrainerForCausalLM`; generation intervenes on the prompt's last token.
* **LoRA**: PEFT ``r=8, alpha=16`` on ``q_proj``/``v_proj``, trained with ``transformers.Trainer``
  on the same tokenized examples (the model's own causal-LM loss: the same cross-entropy).

``python benchmarks/lofit_clutrr.py`` (512 train / 450 test examples) or ``--quick`` (64 train /
100 test). Results go into ``docs/lofit_results.md`` (section ``clutrr``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, load_average, machine_info, markdown_table, replace_section
from lofit_truthfulqa import (
    RESULTS,
    apply_overrides,
    command_line,
    count_trainable,
    head_dim,
    lofit_runs,
    log,
    setup_threads,
)

import reftlib
from reftlib.evaluation import clutrr_sft_examples, load_clutrr
from reftlib.lofit import evaluate_task, make_sft_dataset
from reftlib.lofit._fit import training_arguments
from reftlib.offline import load_default_model
from reftlib.training import ReftDataCollator, ReftTrainerForCausalLM


def default_settings(quick: bool) -> dict[str, Any]:
    """Every hyperparameter of the run."""
    return {
        "train_examples": 64 if quick else 512,
        "eval_examples": 100 if quick else None,  # None = all 450
        "batch_size": 8,
        "max_new_tokens": 8,
        "select": {"epochs": 2, "lr": 5e-3, "l1": 1e-3},
        "lofit": {"epochs": 3, "lr": 2e-2, "fractions": [0.03, 0.10]},  # not tuned: the paper's upper end
        "loreft": {"epochs": 3, "lr": 1e-2, "rank": 4, "layer": 15},
        "lora": {"epochs": 3, "lr": 5e-4, "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        "seed": 42,
    }


def evaluate(model: Any, tokenizer, rows, settings) -> dict[str, Any]:
    out = evaluate_task("clutrr", model, tokenizer, rows, max_new_tokens=settings["max_new_tokens"], progress=False)
    return scores_of(out["metrics"], out["per_example"], out["n"], out["eval_s"], rows)


def scores_of(metrics, per_example, n, eval_s, rows) -> dict[str, Any]:
    """The table's columns from :func:`reftlib.lofit.evaluate_task`'s output (``lenient``: a final period allowed)."""
    predictions = [e["prediction"] for e in per_example]
    lenient = [p.rstrip(".").strip().lower() == r.target.lower() for p, r in zip(predictions, rows)]
    return {"accuracy": metrics["exact_match"]["value"], "lenient": sum(lenient) / len(lenient), "n": n,
            "eval_s": eval_s, "examples": list(zip(predictions[:5], [r.target for r in rows[:5]]))}


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
    """LoFiT with :func:`reftlib.lofit.run_lofit_task` (what ``reftlib lofit clutrr`` runs), both K."""
    model, _ = load_default_model()
    results = []
    for out, chosen in lofit_runs("clutrr", settings, args, settings["train_examples"], settings["eval_examples"]):
        select_s = results[0]["select_s"] if results else out["timing"]["select_s"]
        results.append({"method": f"LoFiT ({round(out['heads']['fraction'] * 100)}% = {chosen.k} heads)",
                        "params": out["trainable_parameters"], "train_s": out["timing"]["offsets_s"] + select_s,
                        "select_s": select_s, "selection_params": chosen.scores.numel() * head_dim(model),
                        **scores_of(out["metrics"], out["per_example"], out["n_eval"], out["timing"]["eval_s"], rows)})
        log(f"{results[-1]}")
    return results


def run_loreft(tokenizer, pairs, rows, settings, quiet) -> dict[str, Any]:
    model, _ = load_default_model()
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
            **evaluate(reft_model, tokenizer, rows, settings)}


def run_lora(tokenizer, pairs, rows, settings, quiet) -> dict[str, Any]:
    import peft

    model, _ = load_default_model()
    cfg = settings["lora"]
    torch.manual_seed(settings["seed"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                                                      target_modules=list(cfg["targets"])))
    dataset = make_sft_dataset(tokenizer, pairs, model=model)
    train_s = train(Trainer, lora, tokenizer, dataset, cfg, settings, quiet)
    lora.eval()
    return {"method": f"LoRA (r={cfg['r']}, {'/'.join(cfg['targets'])})", "params": count_trainable(lora),
            "train_s": train_s, **evaluate(lora, tokenizer, rows, settings)}


def report(results, settings, info, args) -> str:
    base = results[0]
    rows = []
    for r in results:
        delta = "" if r is base else f" ({100 * (r['accuracy'] - base['accuracy']):+.1f})"
        train = "-" if r is base else f"{r['train_s'] / 60:.1f} min"
        if "select_s" in r:
            train += f" (incl. {r['select_s'] / 60:.1f} min shared head selection)"
        rows.append([r["method"], f"{100 * r['accuracy']:.1f}{delta}", f"{100 * r['lenient']:.1f}",
                     "0" if r is base else f"{r['params']:,}", train, f"{r['eval_s'] / 60:.1f} min"])
    s = settings
    table = markdown_table(["method", f"exact match % ({args.eval_split}, n={base['n']})",
                            "ignoring a final period %", "trainable params", "train wall time", "eval wall time"],
                           rows)
    return "\n".join([
        f"### CLUTRR, SmolLM2-135M-Instruct{' (quick run)' if args.quick else ''}",
        "",
        table,
        "",
        f"Machine: {describe_machine(info)}",
        "",
        f"Settings (`{command_line('lofit_clutrr.py', args)}`):",
        "",
        f"* Training data: {s['n_train']} CLUTRR train examples (drawn with seed {s['seed']}), supervised "
        "cross-entropy on `\" \" + relation` + EOS for every method; batch "
        f"{s['batch_size']}, AdamW, linear decay, no weight decay.",
        f"* LoFiT: head selection {s['select']['epochs']} epochs, lr {s['select']['lr']}, L1 λ={s['select']['l1']} "
        f"(one run, shared by both K); offsets {s['lofit']['epochs']} epochs, lr {s['lofit']['lr']} "
        "(`reftlib.lofit.run_lofit_task`, as `reftlib lofit clutrr`).",
        f"* LoReFT: rank {s['loreft']['rank']}, layer {s['loreft']['layer']} `block_output`, last prompt token, "
        f"{s['loreft']['epochs']} epochs, lr {s['loreft']['lr']}.",
        f"* LoRA (PEFT): r={s['lora']['r']}, alpha={s['lora']['alpha']}, {', '.join(s['lora']['targets'])}, "
        f"{s['lora']['epochs']} epochs, lr {s['lora']['lr']} (`transformers.Trainer`, the model's causal-LM loss).",
        f"* Evaluation: greedy generation (≤ {s['max_new_tokens']} new tokens), first line, stripped, "
        f"case-insensitive exact match against the relation on {base['n']} {args.eval_split} examples. The "
        "second column also accepts the answer followed by a period (the base model ends its answers with one).",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 train examples, 100 eval examples")
    parser.add_argument("--eval-split", choices=["val", "test"], default="test")
    parser.add_argument("--methods", default="base,lofit,loreft,lora", help="comma-separated subset")
    parser.add_argument("--data-dir", default=None, help="folder with clutrr/ (default: ../shared/data)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores, or 1 when the machine is already busy)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a setting, e.g. --set lofit.lr=0.02 (dotted keys)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/lofit_results.md")
    args = parser.parse_args(argv)

    threads = setup_threads(args.threads)
    settings = apply_overrides(default_settings(args.quick), args.set)
    try:
        train_rows = load_clutrr("train", args.data_dir)
        eval_rows = load_clutrr(args.eval_split, args.data_dir)
    except reftlib.ReftError as exc:
        sys.exit(f"CLUTRR data not found, skipping the benchmark: {exc}")
    train_rows = random.Random(settings["seed"]).sample(train_rows, min(settings["train_examples"], len(train_rows)))
    eval_rows = eval_rows[: settings["eval_examples"]] if settings["eval_examples"] else eval_rows
    settings["n_train"] = len(train_rows)
    pairs = clutrr_sft_examples(train_rows)
    quiet = {"disable_tqdm": True, "logging_steps": 10**6}
    info = machine_info(torch.device("cpu"))
    _, tokenizer = load_default_model()
    methods = args.methods.split(",")
    log(f"{len(pairs)} training examples, {len(eval_rows)} {args.eval_split} examples, {threads} thread(s), "
        f"settings {settings}")
    results: list[dict[str, Any]] = []
    if "base" in methods:
        model, _ = load_default_model()
        results.append({"method": "base model", "params": 0, "train_s": 0.0,
                        **evaluate(model, tokenizer, eval_rows, settings)})
        log(f"{results[-1]}")
    if "lofit" in methods:
        results.extend(run_lofit(eval_rows, settings, args))
    if "loreft" in methods:
        results.append(run_loreft(tokenizer, pairs, eval_rows, settings, quiet))
        log(f"{results[-1]}")
    if "lora" in methods:
        results.append(run_lora(tokenizer, pairs, eval_rows, settings, quiet))
        log(f"{results[-1]}")
    info["load_end"] = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "machine": info, "results": results}, indent=1,
                                              default=str))
    if results and results[0]["method"] == "base model" and len(results) > 1:
        text = report(results, settings, info, args)
        print(text)
        if not args.no_write:
            replace_section(RESULTS, "clutrr", text)


if __name__ == "__main__":
    main()
