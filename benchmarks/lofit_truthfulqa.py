"""LoFiT on TruthfulQA (fold 0) with SmolLM2-135M-Instruct: base model vs LoFiT (3 %, 10 % of heads), LoReFT, LoRA.

Every method is trained with the same DPO objective (β = 0.1, reference = the model with its
interventions/adapter switched off, reference log-probabilities precomputed once) on the same
preference pairs built from the fold-0 *train* questions: one pair per question, the best answer
against one incorrect answer drawn with a fixed seed. Evaluation is TruthfulQA MC1/MC2
(:func:`reftlib.evaluation.truthfulqa_mc`, prompt ``"Q: {question}\\nA:"``) on fold-0 *test*
(``--eval-split val`` scores the 82 validation questions instead: hyperparameters were tuned
there, never on test).

* **LoFiT**: :func:`reftlib.lofit.select_heads` (scales on all 270 heads, L1) once, then
  :func:`reftlib.lofit.tune_offsets` on the top 3 % (8) and top 10 % (27) heads of that ranking.
* **LoReFT**: rank 4 at ``block_output`` of a middle layer (15 of 30), last prompt token, trained
  with :class:`reftlib.lofit.ReftDPOTrainer`. ``truthfulqa_mc`` places its ``"l1"`` intervention on
  the last prompt token of every scored ``prompt + answer`` sequence, as in training.
* **LoRA**: PEFT ``r=8, alpha=16`` on ``q_proj``/``v_proj``, trained with
  :class:`reftlib.lofit.AdapterDPOTrainer` (the same loss, collator and reference handling).

Run ``python benchmarks/lofit_truthfulqa.py`` (full: all 326 train / 409 test questions) or with
``--quick`` (64 train questions, the first 100 test questions). Results go into
``docs/lofit_results.md`` (section ``truthfulqa``) and, as JSON, to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, describe_machine, load_average, machine_info, markdown_table, replace_section

import reftlib
from reftlib.evaluation import load_truthfulqa, truthfulqa_prompt
from reftlib.lofit import (
    AdapterDPOTrainer,
    HeadSelection,
    ReftDPOTrainer,
    apply_iti,
    apply_repe,
    evaluate_task,
    get_task_spec,
    iti_probe_heads,
    load_task_data,
    make_preference_data_module,
    repe_reading_vectors,
    run_lofit_task,
    select_heads,
    truthfulqa_dpo_pairs,
    tune_iti_alpha,
    tune_repe_alpha,
)
from reftlib.lofit._fit import training_arguments
from reftlib.offline import load_default_model

RESULTS = DOCS / "lofit_results.md"
#: What ``--methods`` may name, in the order they run.
METHODS = ("base", "lofit", "loreft", "lora", "iti", "repe", "lofit-random", "lofit-other")


# --------------------------------------------------------------------------- settings
def default_settings(quick: bool) -> dict[str, Any]:
    """Every hyperparameter of the run (tuned lightly on the validation questions)."""
    return {
        "train_questions": 64 if quick else None,  # None = all 326
        "eval_questions": 100 if quick else None,  # None = all (409 test / 82 val)
        "val_questions": None,  # ITI/RepE tuning questions; None = all 82 validation questions
        "batch_size": 8,
        "beta": 0.1,
        "select": {"epochs": 2, "lr": 5e-3, "l1": 1e-3},
        # lr 3e-2 won on the validation questions over 1e-2 (both K, --quick, see docs/lofit_results.md)
        "lofit": {"epochs": 3, "lr": 3e-2, "fractions": [0.03, 0.10]},
        "loreft": {"epochs": 3, "lr": 1e-2, "rank": 4, "layer": 15},
        "lora": {"epochs": 3, "lr": 5e-4, "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        # learning-free baselines: the grids are searched on the validation questions (MC2), never on test
        "iti": {"heads": [8, 27], "alphas": [2.5, 5, 10, 15, 20, 30, 40], "val_fraction": 0.2},
        "repe": {"layer_sets": [[15], list(range(10, 20))], "alphas": [4, 8, 16, 32, 64, 128, 256, 512], "method": "pca"},
        # the localization ablation: LoFiT's offsets (3 % of heads, same settings) on random heads and on heads
        # selected for another task (step 1 on that task's first training examples drawn with the seed)
        "ablation": {"fraction": 0.03, "other_task": "clutrr", "other_max_train": 128},
        "seed": 42,
        "device": "cpu",  # --device / --dtype
        "dtype": "fp32",
    }


#: ``--dtype`` names.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def base_model(settings: dict[str, Any]) -> nn.Module:
    """A fresh offline SmolLM2 on the run's device, in its dtype."""
    return load_default_model(dtype=DTYPES[settings["dtype"]], device=settings["device"])[0]


def trainer_overrides(settings: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments every trainer of the run gets: quiet, and on the run's device."""
    return {"disable_tqdm": True, "logging_steps": 10**6, "use_cpu": settings["device"] == "cpu"}


#: One (prompt, best answer, incorrect answer) triple per question; the incorrect one drawn with the seed.
preference_pairs = truthfulqa_dpo_pairs


# --------------------------------------------------------------------------- evaluation helpers
def head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def evaluate(model: Any, tokenizer, rows) -> dict[str, float]:
    scores = evaluate_task("truthfulqa", model, tokenizer, rows, progress=False)
    return scores_entry(scores["metrics"], scores["per_example"], scores["eval_s"])


def scores_entry(metrics: dict[str, Any], per_example: Sequence[dict[str, Any]], eval_s: float) -> dict[str, Any]:
    """A result row's scores: MC1/MC2, their standard errors and each question's scores (for paired comparisons)."""
    return {"mc1": metrics["mc1"]["value"], "mc2": metrics["mc2"]["value"], "mc1_se": metrics["mc1"]["stderr"],
            "mc2_se": metrics["mc2"]["stderr"], "n": metrics["mc1"]["n"], "eval_s": eval_s,
            "per_question": {name: [q[name] for q in per_example] for name in ("mc1", "mc2")}}


def lofit_runs(task: str, settings: dict[str, Any], args, max_train: int | None, max_eval: int | None):
    """``(result, selection)`` of :func:`reftlib.lofit.run_lofit_task` for each K in ``settings["lofit"]``.

    Head selection runs once, for the first K; the other K reuse its ranking (``heads_from``).
    """
    sel = settings["select"]
    with tempfile.TemporaryDirectory() as tmp:
        first: Path | None = None
        for i, fraction in enumerate(settings["lofit"]["fractions"]):
            folder = Path(tmp) / str(i)
            result = run_lofit_task(
                task, data_dir=args.data_dir, heads=fraction, seed=settings["seed"], output_dir=folder,
                max_train=max_train, max_eval=max_eval, eval_split=args.eval_split, epochs=settings["lofit"]["epochs"],
                lr=settings["lofit"]["lr"], select_epochs=sel["epochs"], select_lr=sel["lr"], l1=sel["l1"],
                batch_size=settings["batch_size"], heads_from=first, device=settings["device"],
                dtype=settings["dtype"], progress=False, plot=False, log=log)
            first = first or folder
            yield result, HeadSelection.load(folder)


def setup_threads(requested: int | None) -> int:
    """Use ``requested`` torch threads, else every core, or one when the machine is already busy.

    On a loaded machine, several OpenMP threads per process wait on each other and run several
    times slower than one thread.
    """
    cores = os.cpu_count() or 1
    threads = requested or (1 if load_average()[0] > cores - 0.5 else cores)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return threads


def apply_overrides(settings: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set key.sub=JSON`` overrides to the nested ``settings``."""
    for item in items:
        key, value = item.split("=", 1)
        target = settings
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        if last not in target:
            raise SystemExit(f"--set {item}: unknown setting {key!r}")
        target[last] = json.loads(value)
    return settings


def command_line(script: str, args) -> str:
    """The command that reproduces this run."""
    parts = [f"python benchmarks/{script}"] + ([f"--task {args.task}"] if getattr(args, "task", None) else [])
    parts += ["--quick"] if args.quick else []
    parts += [f"--eval-split {args.eval_split}"] if args.eval_split != "test" else []
    parts += [f"--device {args.device}"] if getattr(args, "device", "cpu") != "cpu" else []
    parts += [f"--dtype {args.dtype}"] if getattr(args, "dtype", "fp32") != "fp32" else []
    return " ".join(parts + [f"--set {item}" for item in args.set])


def result_line(result: dict[str, Any]) -> str:
    """One result row in a log line (the JSON keeps everything, per-question scores included)."""
    scores = ", ".join(f"{name} {100 * result[name]:.1f}" for name in ("mc1", "mc2", "accuracy") if name in result)
    return f"{result['method']}: {scores}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[0]:.1f}] {message}", flush=True)


# --------------------------------------------------------------------------- methods
def run_lofit(settings, args) -> list[dict[str, Any]]:
    """LoFiT with :func:`reftlib.lofit.run_lofit_task` (what ``reftlib lofit truthfulqa`` runs), both K."""
    model, _ = load_default_model()
    results = []
    for out, chosen in lofit_runs("truthfulqa", settings, args, settings["train_questions"],
                                  settings["eval_questions"]):
        select_s = results[0]["select_s"] if results else out["timing"]["select_s"]
        if not results:
            chosen.top(fraction=settings["lofit"]["fractions"][0]).save(DOCS / "img" / "lofit_truthfulqa_heads.json")
        with_plot = DOCS / "img" / f"lofit_truthfulqa_heads_{round(out['heads']['fraction'] * 100)}pct.png"
        try:
            chosen.plot(with_plot, title=f"SmolLM2-135M TruthfulQA: top {chosen.k} heads")
        except reftlib.ReftError as exc:  # matplotlib missing: the table is still produced
            log(f"no plot: {exc}")
        results.append({
            "method": f"LoFiT ({round(out['heads']['fraction'] * 100)}% = {chosen.k} heads)",
            "params": out["trainable_parameters"], "train_s": out["timing"]["offsets_s"] + select_s,
            "select_s": select_s, "selection_params": chosen.scores.numel() * head_dim(model),
            **scores_entry(out["metrics"], out["per_example"], out["timing"]["eval_s"]), "heads": chosen.heads,
        })
        log(result_line(results[-1]))
    return results


def run_loreft(tokenizer, triples, rows, settings, quiet) -> dict[str, Any]:
    model = base_model(settings)
    cfg = settings["loreft"]
    torch.manual_seed(settings["seed"])
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([{
        "layer": cfg["layer"], "component": "block_output", "positions": "l1",
        "intervention": reftlib.LoreftIntervention(low_rank_dimension=cfg["rank"])}]))
    module = make_preference_data_module(tokenizer, reft_model, triples, positions="l1")
    start = time.perf_counter()
    train(ReftDPOTrainer, reft_model, tokenizer, module, cfg, settings, quiet)
    train_s = time.perf_counter() - start
    reft_model.eval()
    scores = evaluate(reft_model, tokenizer, rows)
    return {"method": f"LoReFT (rank {cfg['rank']}, layer {cfg['layer']}, last prompt token)",
            "params": reft_model.count_parameters(), "train_s": train_s, **scores}


def run_lora(tokenizer, triples, rows, settings, quiet) -> dict[str, Any]:
    import peft

    model = base_model(settings)
    cfg = settings["lora"]
    torch.manual_seed(settings["seed"])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                                                      target_modules=list(cfg["targets"])))
    module = make_preference_data_module(tokenizer, model, triples)
    start = time.perf_counter()
    train(AdapterDPOTrainer, lora, tokenizer, module, cfg, settings, quiet)
    train_s = time.perf_counter() - start
    lora.eval()
    scores = evaluate(lora, tokenizer, rows)
    return {"method": f"LoRA (r={cfg['r']}, {'/'.join(cfg['targets'])})", "params": count_trainable(lora),
            "train_s": train_s, **scores}


def lofit_ablation_run(task: str, settings, args, condition: str, tokenizer, max_train: int | None,
                       max_eval: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """LoFiT offsets on heads not selected for ``task``: ``"random"`` heads (drawn with the seed) or
    ``"other"``: the heads step 1 selects for ``ablation.other_task`` (same step-1 settings, that task's
    loss). Everything else is the LoFiT row's run (same fraction, epochs, lr, seed, data).

    Returns :func:`reftlib.lofit.run_lofit_task`'s output and the result row's fields (scores not included)."""
    cfg, sel = settings["ablation"], settings["select"]
    extra: dict[str, Any] = {"random_heads": True}
    label = "random heads"
    select_s = 0.0
    if condition == "other":
        other = cfg["other_task"]
        data = load_task_data(other, args.data_dir, max_train=cfg["other_max_train"], seed=settings["seed"])
        model = base_model(settings)
        start = time.perf_counter()
        selection = select_heads(model, tokenizer, data.train, fraction=cfg["fraction"], l1=sel["l1"], lr=sel["lr"],
                                 epochs=sel["epochs"], batch_size=settings["batch_size"],
                                 beta=get_task_spec(other).beta, seed=settings["seed"],
                                 training_args=trainer_overrides(settings))
        select_s = time.perf_counter() - start
        log(f"heads selected for {other} ({len(data.train)} training examples): {selection}")
        extra = {"heads_from": selection}
        label = f"heads selected for {get_task_spec(other).title}"
    out = run_lofit_task(
        task, data_dir=args.data_dir, heads=cfg["fraction"], seed=settings["seed"], max_train=max_train,
        max_eval=max_eval, eval_split=args.eval_split, epochs=settings["lofit"]["epochs"], lr=settings["lofit"]["lr"],
        batch_size=settings["batch_size"], device=settings["device"], dtype=settings["dtype"], progress=False,
        plot=False, log=log, **extra)
    k = out["heads"]["k"]
    return out, {"method": f"LoFiT ({round(cfg['fraction'] * 100)}% = {k} {label})", "ablation": condition,
                 "params": out["trainable_parameters"], "train_s": out["timing"]["offsets_s"] + select_s,
                 "select_s": select_s, "heads": [tuple(h) for h in out["heads"]["selected"]]}


def run_lofit_ablation(settings, args, condition: str, tokenizer) -> dict[str, Any]:
    """:func:`lofit_ablation_run` on TruthfulQA, scored."""
    out, row = lofit_ablation_run("truthfulqa", settings, args, condition, tokenizer, settings["train_questions"],
                                  settings["eval_questions"])
    return {**row, **scores_entry(out["metrics"], out["per_example"], out["timing"]["eval_s"])}


def answer_texts(rows) -> tuple[list[str], list[str], list[int], list[int]]:
    """ITI's probe data: ``prompt + " " + answer`` for every true answer (best answer included) and every
    false answer of each question, with the question's index for each text (so splits keep questions whole)."""
    pos, neg, pos_q, neg_q = [], [], [], []
    for i, row in enumerate(rows):
        prompt = truthfulqa_prompt(row.question)
        true = [row.best_answer] + [a for a in row.correct_answers if a != row.best_answer]
        pos += [f"{prompt} {a}" for a in true]
        neg += [f"{prompt} {a}" for a in row.incorrect_answers]
        pos_q += [i] * len(true)
        neg_q += [i] * len(row.incorrect_answers)
    return pos, neg, pos_q, neg_q


def search_iti(tokenizer, pos, neg, groups, score_fn, metric: str | None, settings) -> tuple[Any, dict[str, Any]]:
    """ITI on the base model: probes on ``pos``/``neg`` texts (``groups`` keep related texts in one split),
    then (K, α) searched over ``settings["iti"]``'s grid with ``score_fn`` (validation data only).

    Returns the ITI model with the chosen (K, α) and the result row's fields (choice, search, timing)."""
    model = base_model(settings)
    cfg = settings["iti"]
    start = time.perf_counter()
    probes = iti_probe_heads(model, tokenizer, pos, neg, groups=groups, val_fraction=cfg["val_fraction"],
                             seed=settings["seed"], progress=False)
    probe_s = time.perf_counter() - start
    search = {}
    for k in cfg["heads"]:
        found = tune_iti_alpha(model, probes, score_fn, alphas=cfg["alphas"], k=k, metric=metric)
        search[k] = found.scores
        log(f"ITI K={k}: validation {metric or 'score'} by alpha {found.scores}")
    k, alpha = max(((k, a) for k in search for a in search[k]), key=lambda ka: search[ka[0]][ka[1]])
    tune_s = time.perf_counter() - start - probe_s
    reft_model = apply_iti(model, probes, k=k, alpha=alpha)
    reft_model.eval()
    return reft_model, {"method": f"ITI ({k} heads, α = {alpha:g})", "params": 0,
                        "computed_values": k * probes.head_dim, "train_s": probe_s + tune_s, "tune_s": tune_s,
                        "choice": {"heads": k, "alpha": alpha}, "search": {str(k): v for k, v in search.items()},
                        "heads": probes.top(k), "probe_texts": len(pos) + len(neg)}


def search_repe(tokenizer, pos, neg, score_fn, metric: str | None, settings) -> tuple[Any, dict[str, Any]]:
    """RepE on the base model: reading vectors from the paired ``pos[i]``/``neg[i]`` texts, then (layers, α)
    searched over ``settings["repe"]``'s grid with ``score_fn`` (validation data only), added at every token.

    Returns the RepE model with the chosen (layers, α) and the result row's fields."""
    model = base_model(settings)
    cfg = settings["repe"]
    layers = sorted({layer for group in cfg["layer_sets"] for layer in group})
    start = time.perf_counter()
    vectors = repe_reading_vectors(model, tokenizer, pos, neg, layers, method=cfg["method"], progress=False)
    read_s = time.perf_counter() - start
    search = {}
    for group in cfg["layer_sets"]:
        found = tune_repe_alpha(model, vectors, score_fn, alphas=cfg["alphas"], layers=group, metric=metric)
        search[tuple(group)] = found.scores
        log(f"RepE layers {group}: validation {metric or 'score'} by alpha {found.scores}")
    group, alpha = max(((g, a) for g in search for a in search[g]), key=lambda ga: search[ga[0]][ga[1]])
    tune_s = time.perf_counter() - start - read_s
    reft_model = apply_repe(model, vectors, alpha, group)
    reft_model.eval()
    where = f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}-{group[-1]}"
    return reft_model, {"method": f"RepE ({cfg['method']} reading vectors, {where}, α = {alpha:g})", "params": 0,
                        "computed_values": len(group) * model.config.hidden_size, "train_s": read_s + tune_s,
                        "tune_s": tune_s, "choice": {"layers": list(group), "alpha": alpha},
                        "search": {"-".join(map(str, g)): v for g, v in search.items()}, "probe_texts": len(pos)}


def run_iti(tokenizer, train_rows, val_rows, rows, settings) -> dict[str, Any]:
    """ITI: probes on the train questions' answers, (K, α) chosen on the validation questions' MC2."""
    pos, neg, pos_q, neg_q = answer_texts(train_rows)
    reft_model, row = search_iti(tokenizer, pos, neg, pos_q + neg_q, lambda m: evaluate(m, tokenizer, val_rows),
                                 "mc2", settings)
    return {**row, **evaluate(reft_model, tokenizer, rows)}


def run_repe(tokenizer, triples, val_rows, rows, settings) -> dict[str, Any]:
    """RepE: reading vectors from the training pairs (chosen vs rejected answer), (layers, α) chosen on the
    validation questions' MC2, added at every token."""
    reft_model, row = search_repe(tokenizer, [p + c for p, c, _ in triples], [p + r for p, _, r in triples],
                                  lambda m: evaluate(m, tokenizer, val_rows), "mc2", settings)
    return {**row, **evaluate(reft_model, tokenizer, rows)}


def train(trainer_cls: Callable, model, tokenizer, module, cfg, settings, quiet) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, lr=cfg["lr"], epochs=cfg["epochs"], batch_size=settings["batch_size"],
                                  seed=settings["seed"], overrides=quiet)
        trainer = trainer_cls(model=model, args=args, tokenizer=tokenizer, beta=settings["beta"],
                              precompute_reference=True, train_dataset=module["train_dataset"],
                              data_collator=module["data_collator"])
        trainer.train()


# --------------------------------------------------------------------------- report
def report(results: Sequence[dict[str, Any]], settings: dict[str, Any], info: dict[str, Any], args) -> str:
    base = next(r for r in results if r["method"] == "base model")
    rows = []
    for r in results:
        delta = "" if r is base else f" ({100 * (r['mc1'] - base['mc1']):+.1f})"
        delta2 = "" if r is base else f" ({100 * (r['mc2'] - base['mc2']):+.1f})"
        params = "0" if r is base else f"{r['params']:,}"
        train = "-" if r is base else f"{r['train_s'] / 60:.1f} min"
        if r.get("ablation") == "other":
            train += f" (incl. {r['select_s'] / 60:.1f} min head selection on the other task)"
        elif "select_s" in r and "ablation" not in r:
            train += f" (incl. {r['select_s'] / 60:.1f} min shared head selection)"
        rows.append([r["method"], f"{100 * r['mc1']:.1f}{delta}", f"{100 * r['mc2']:.1f}{delta2}", params, train,
                     f"{r['eval_s'] / 60:.1f} min"])
    split = args.eval_split
    n_eval = results[0]["n"]
    table = markdown_table(
        ["method", f"MC1 % ({split}, n={n_eval})", f"MC2 % ({split})", "trainable params", "train wall time",
         "eval wall time"], rows)
    lines = [
        f"### TruthfulQA fold 0, SmolLM2-135M-Instruct{' (quick run)' if args.quick else ''}",
        "",
        table,
        "",
        f"Machine: {describe_machine(info)}",
        "",
        f"Settings (`{command_line('lofit_truthfulqa.py', args)}`):",
        "",
        *settings_bullets(settings, n_eval, split, max(r.get("selection_params", 0) for r in results)),
    ]
    return "\n".join(lines)


def settings_bullets(s: dict[str, Any], n_eval: int, split: str, selection_params: int) -> list[str]:
    """The settings of a run as markdown bullets (what every table of the TruthfulQA section lists)."""
    iti, repe, abl = s.get("iti"), s.get("repe"), s.get("ablation")
    bullets = [
        f"* Training data: {s['n_train']} fold-0 train questions, one DPO pair each (best answer vs. one incorrect "
        f"answer drawn with the seed); every trained method uses DPO with beta={s['beta']}, the reference being the "
        "same model with its interventions/adapter off (log-probabilities precomputed once), batch "
        f"{s['batch_size']} pairs, AdamW, linear decay, no weight decay.",
        f"* LoFiT: head selection {s['select']['epochs']} epochs, lr {s['select']['lr']}, L1 λ={s['select']['l1']} "
        f"(one run, ranking shared by both K); offsets {s['lofit']['epochs']} epochs, lr {s['lofit']['lr']}, "
        "at every position. Head heatmaps: `docs/img/lofit_truthfulqa_heads_*pct.png`.",
        f"* LoReFT: rank {s['loreft']['rank']}, layer {s['loreft']['layer']} `block_output`, last prompt token, DPO, "
        f"{s['loreft']['epochs']} epochs, lr {s['loreft']['lr']}.",
        f"* LoRA (PEFT): r={s['lora']['r']}, alpha={s['lora']['alpha']}, {', '.join(s['lora']['targets'])}, DPO "
        f"(`AdapterDPOTrainer`, same loss as the others), {s['lora']['epochs']} epochs, lr {s['lora']['lr']}.",
    ]
    if iti:
        bullets.append(
            f"* ITI: a logistic probe per head on the last-token head outputs of every train question's true "
            f"(positive) and false (negative) answers, `Q: ... A: answer`, split by question "
            f"({round(100 * (1 - iti['val_fraction']))} / {round(100 * iti['val_fraction'])}, the seed); heads "
            f"ranked by probe accuracy; K ∈ {iti['heads']} × α ∈ {iti['alphas']} (α·σ·θ mass-mean shift at every "
            "token) searched on the 82 validation questions' MC2.")
    if repe:
        sets = " and ".join(f"{g[0]}" if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in repe["layer_sets"])
        bullets.append(
            f"* RepE: {repe['method']} reading vectors (unit length) of the residual stream (`block_output`, last "
            "token) from the training pairs (question + best answer vs. + the drawn incorrect answer); added as "
            f"α·v at every token; layers {sets} × α ∈ {repe['alphas']} searched on the validation questions' MC2.")
    if abl:
        bullets.append(
            f"* Ablation rows: LoFiT's offsets (the LoFiT settings above, {round(100 * abl['fraction'])}% of heads) on "
            f"heads drawn at random with the seed, or on the heads step 1 selects for {abl['other_task']} "
            f"({abl['other_max_train']} training examples drawn with the seed, the same step-1 settings).")
    bullets.append(
        f"* Evaluation: MC1/MC2 on {n_eval} fold-0 {split} questions, prompt `Q: {{question}}\\nA:`, summed "
        "answer log-probabilities (`reftlib.evaluation.truthfulqa_mc`). Trainable parameters exclude LoFiT's "
        f"step-1 scales ({selection_params:,}, discarded after selection).")
    return bullets


def add_run_arguments(parser: argparse.ArgumentParser, data: str) -> None:
    """The options every LoFiT task benchmark takes (``data``: the data folder's subfolders it reads)."""
    parser.add_argument("--data-dir", default=None, help=f"folder with {data} (default: ../shared/data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU: add --dtype bf16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the base model's dtype")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores, or 1 when the machine is already busy)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a setting, e.g. --set lofit.lr=0.02 (dotted keys)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/lofit_results.md")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 train questions, 100 eval questions")
    parser.add_argument("--eval-split", choices=["val", "test"], default="test")
    parser.add_argument("--methods", default="base,lofit,loreft,lora,iti,repe",
                        help=f"comma-separated subset of {', '.join(METHODS)} (the last two: the ablation)")
    add_run_arguments(parser, "truthfulqa/")
    parser.add_argument("--combine", nargs="+", default=None, metavar="RUN.json",
                        help="run nothing: render the tables from these --json files (several seeds and methods)")
    args = parser.parse_args(argv)

    if args.combine:
        from lofit_tables import load_runs, render

        rows, headers = load_runs(args.combine)
        first = headers[0]["settings"]
        settings = {**default_settings(False), **{k: v for h in headers for k, v in h["settings"].items()}}
        settings["seed"] = first["seed"]
        bullets = settings_bullets(settings, rows[0]["n"], "test",
                                   max(r.get("selection_params", 0) for r in rows))
        sections = render(rows, headers, bullets)
        for name, text in sections.items():
            print(text, end="\n\n")
            if not args.no_write:
                replace_section(RESULTS, name, text)
        return
    threads = setup_threads(args.threads)
    settings = apply_overrides(default_settings(args.quick), args.set)
    settings.update(device=args.device, dtype=args.dtype)
    try:
        train_rows = load_truthfulqa("train", args.data_dir)
        eval_rows = load_truthfulqa(args.eval_split, args.data_dir)
    except reftlib.ReftError as exc:
        sys.exit(f"TruthfulQA data not found, skipping the benchmark: {exc}")
    train_rows = train_rows[: settings["train_questions"]] if settings["train_questions"] else train_rows
    eval_rows = eval_rows[: settings["eval_questions"]] if settings["eval_questions"] else eval_rows
    settings["n_train"] = len(train_rows)
    triples = preference_pairs(train_rows, settings["seed"])
    quiet = trainer_overrides(settings)
    info = machine_info(torch.device(settings["device"]))
    _, tokenizer = load_default_model()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    log(f"{len(triples)} training pairs, {len(eval_rows)} {args.eval_split} questions, {threads} thread(s), "
        f"settings {settings}")

    val_rows = load_truthfulqa("val", args.data_dir)[: settings["val_questions"]] if {"iti", "repe"} & set(methods) else []
    runs: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "base": lambda: [{"method": "base model", "params": 0, "train_s": 0.0,
                          **evaluate(base_model(settings), tokenizer, eval_rows)}],
        "lofit": lambda: run_lofit(settings, args),
        "loreft": lambda: [run_loreft(tokenizer, triples, eval_rows, settings, quiet)],
        "lora": lambda: [run_lora(tokenizer, triples, eval_rows, settings, quiet)],
        "lofit-random": lambda: [run_lofit_ablation(settings, args, "random", tokenizer)],
        "lofit-other": lambda: [run_lofit_ablation(settings, args, "other", tokenizer)],
        "iti": lambda: [run_iti(tokenizer, train_rows, val_rows, eval_rows, settings)],
        "repe": lambda: [run_repe(tokenizer, triples, val_rows, eval_rows, settings)],
    }
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
        Path(args.json).write_text(json.dumps({"settings": settings, "machine": info, "results": results}, indent=1,
                                              default=str))
    if results and results[0]["method"] == "base model" and len(results) > 1:
        text = report(results, settings, info, args)
        print(text)
        if not args.no_write:
            replace_section(RESULTS, "truthfulqa", text)


if __name__ == "__main__":
    main()
