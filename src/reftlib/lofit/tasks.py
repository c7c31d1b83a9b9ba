"""One call per LoFiT task: head selection -> offset tuning -> evaluation -> files.

The library's equivalent of LoFiT's ``train_script_{task}.sh``, and what ``reftlib lofit TASK`` runs::

    from reftlib.lofit import run_lofit_task

    result = run_lofit_task("truthfulqa", output_dir="lofit-truthfulqa")     # offline SmolLM2
    result["metrics"]["mc1"]        # {"value": 0.38, "stderr": 0.024, "n": 409}

``output_dir`` receives the trained offsets (``ReftModel.save_pretrained``: load them with
``ReftModel.from_pretrained(output_dir, model)``), ``head_selection.json`` (the heads and their
scores, :meth:`HeadSelection.load`), ``heads.png`` (the heatmap, when matplotlib is installed),
``results.json`` and ``results.md``.

Where the heads come from is the localization ablation of the LoFiT paper:

* by default, selected for this task (step 1, :func:`~reftlib.lofit.select_heads`);
* ``heads_from=``: the selection saved by another run (another task), step 1 skipped;
* ``random_heads=True``: the same number of heads drawn uniformly with ``seed``, step 1 skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_bytes
from ..errors import MissingDependencyError, ReftConfigError
from ..offline import load_model
from .offsets import tune_offsets
from .selection import HeadSelection, count_heads, select_heads
from .task_data import evaluate_task, get_task_spec, load_task_data

__all__ = ["DTYPE_ALIASES", "HEATMAP_NAME", "RESULTS_JSON", "RESULTS_MD", "random_head_selection",
           "resolve_heads_from", "results_markdown", "run_lofit_task", "summary_line"]

logger = logging.getLogger(__name__)

#: Accepted ``dtype`` spellings and the dtype each means.
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16"}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
HEATMAP_NAME = "heads.png"


def _head_count(heads: float | int) -> dict[str, Any]:
    """``{"k": n}`` for an integer count, ``{"fraction": f}`` for a fraction in (0, 1)."""
    if isinstance(heads, bool) or not isinstance(heads, (int, float)):
        raise ReftConfigError(f"heads must be a fraction of all heads (0 < heads < 1) or a number of heads, "
                              f"got {heads!r}")
    if isinstance(heads, int) or (heads >= 1 and float(heads).is_integer()):
        if heads < 1:
            raise ReftConfigError(f"heads must be at least 1 head (or a fraction such as 0.03), got {heads!r}")
        return {"k": int(heads)}
    if not 0 < heads < 1:
        raise ReftConfigError(f"heads must be a fraction in (0, 1) such as 0.03, or a whole number of heads, "
                              f"got {heads!r}")
    return {"fraction": float(heads)}


def random_head_selection(model: nn.Module, heads: float | int = 0.03, seed: int = 42) -> HeadSelection:
    """A :class:`HeadSelection` of heads drawn uniformly at random (without repetition) with ``seed``.

    The scores are ``torch.rand`` values from a generator seeded with ``seed``, so the top-k heads are
    a uniform random subset, the same for the same seed and model shape; ``heads`` is a fraction or a
    count, resolved as for :func:`select_heads`.
    """
    num_layers, num_heads = count_heads(model)
    scores = torch.rand(num_layers, num_heads, generator=torch.Generator().manual_seed(seed))
    return HeadSelection(scores, 1, {"method": "random", "seed": seed}).top(**_head_count(heads))


def resolve_heads_from(source: HeadSelection | str | os.PathLike, model: nn.Module,
                       heads: float | int = 0.03) -> HeadSelection:
    """The saved selection ``source`` (a run folder, a ``head_selection.json`` or a :class:`HeadSelection`)
    cut to ``heads`` for ``model``; its shape must be the model's ``[layers, heads per layer]``."""
    selection = source if isinstance(source, HeadSelection) else HeadSelection.load(source)
    shape = count_heads(model)
    if tuple(selection.scores.shape) != shape:
        raise ReftConfigError(
            f"the head selection from {source if not isinstance(source, HeadSelection) else 'heads_from'} is for "
            f"{selection.num_layers} layers x {selection.num_heads} heads, but this model has {shape[0]} x {shape[1]}; "
            "take it from a run on the same model"
        )
    return selection.top(**_head_count(heads))


def _load(model: Any, tokenizer: Any, dtype: str, device: str) -> tuple[nn.Module, Any, str]:
    if dtype not in DTYPE_ALIASES:
        raise ReftConfigError(f"dtype must be one of {', '.join(DTYPE_ALIASES)}, got {dtype!r}")
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ReftConfigError("a model instance needs its tokenizer: pass tokenizer=")
        name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    else:
        name = "default" if model is None else os.fspath(model)
        model, loaded_tokenizer = load_model(name, DTYPE_ALIASES[dtype])
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, name


def run_lofit_task(
    task: str,
    model: str | os.PathLike | nn.Module | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    heads: float | int = 0.03,
    seed: int = 42,
    device: str = "cpu",
    dtype: str = "fp32",
    output_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    eval_split: str = "test",
    epochs: float | None = None,
    lr: float | None = None,
    select_epochs: float | None = None,
    select_lr: float | None = None,
    l1: float | None = None,
    batch_size: int | None = None,
    heads_from: HeadSelection | str | os.PathLike | None = None,
    random_heads: bool = False,
    eval_base: bool = False,
    progress: bool = True,
    plot: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run LoFiT on ``task`` (``"truthfulqa"``, ``"clutrr"`` or ``"mquake"``) end to end.

    Args:
        task: which task (see :mod:`reftlib.lofit.task_data` for its examples and metrics).
        model: ``None`` (the offline SmolLM2-135M-Instruct), a local folder of any Hugging Face causal
            LM, or a loaded model (then pass ``tokenizer``). The model is left without hooks.
        data_dir: the folder holding ``truthfulqa/``, ``clutrr/``, ``mquake/`` (default: found as
            :func:`reftlib.evaluation.find_data_dir` does).
        heads: a fraction of all heads (``0.03``) or a number of heads (``8``).
        seed: for the initial values, the data order, the TruthfulQA pairs, training subsets and
            random heads. device, dtype: where and in which dtype (``fp32``, ``bf16``, ``fp16``) to run.
        output_dir: where to write the adapter, ``head_selection.json``, ``heads.png``,
            ``results.json`` and ``results.md``; ``None`` writes nothing.
        max_train, max_eval, eval_split: how many training / evaluation examples (``None``: all) and
            which split is scored (``"test"``, or ``"val"`` for tuning).
        epochs, lr, select_epochs, select_lr, l1, batch_size: override the task's defaults
            (:meth:`TaskSpec.defaults`) for step 2 (offsets) and step 1 (head selection).
        heads_from: skip step 1 and use this saved selection (a run folder of another task, a
            ``head_selection.json`` or a :class:`HeadSelection`), cut to ``heads``.
        random_heads: skip step 1 and use ``heads`` heads drawn at random with ``seed``.
        eval_base: also score the model without offsets (``result["base_metrics"]``).
        progress: progress bars for training and evaluation. plot: write the heatmap.
        log: receives one line per stage (default: this module's logger at INFO level).

    Returns:
        a JSON-ready dict: ``task``, ``model``, ``metrics`` (``{name: {"value", "stderr", "n"}}``),
        ``trainable_parameters``, ``heads`` (source, ``k``, the ``(layer, head)`` list), ``timing``
        (seconds per stage), ``hyperparameters``, ``data``, ``files`` and ``per_example`` results.

    Raises:
        ReftConfigError: unknown task, missing data files (named), bad ``heads``/``dtype``/limits,
            both ``heads_from`` and ``random_heads``, or a ``heads_from`` selection of another shape.
    """
    say = log or logger.info
    spec = get_task_spec(task)
    if heads_from is not None and random_heads:
        raise ReftConfigError("give heads_from (another run's heads) or random_heads=True, not both")
    count = _head_count(heads)
    settings = spec.defaults()
    overrides = {"epochs": epochs, "lr": lr, "select_epochs": select_epochs, "select_lr": select_lr, "l1": l1,
                 "batch_size": batch_size}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    data = load_task_data(task, data_dir, eval_split=eval_split, max_train=max_train, max_eval=max_eval, seed=seed)
    say(f"{spec.title}: {len(data.train)} training examples ({spec.objective}), {len(data.eval_rows)} "
        f"{eval_split} examples from {data.data_dir}")
    base, tokenizer, model_name = _load(model, tokenizer, dtype, device)
    quiet = {"disable_tqdm": not progress, "logging_steps": 10 if progress else 10**6,
             "use_cpu": torch.device(device).type == "cpu"}
    train_kw = dict(batch_size=settings["batch_size"], beta=settings["beta"], seed=seed, training_args=quiet)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    result: dict[str, Any] = {"task": task, "model": model_name}
    if eval_base:
        say("scoring the base model")
        scores = evaluate_task(task, base, tokenizer, data.eval_rows, progress=progress,
                               max_new_tokens=settings["max_new_tokens"])
        result["base_metrics"], timing["base_eval_s"] = scores["metrics"], scores["eval_s"]

    t0 = time.perf_counter()
    if heads_from is not None:
        selection = resolve_heads_from(heads_from, base, heads)
        source = f"heads_from:{heads_from if not isinstance(heads_from, HeadSelection) else 'selection'}"
        say(f"heads from {heads_from}: {selection}")
    elif random_heads:
        selection = random_head_selection(base, heads, seed)
        source = f"random(seed={seed})"
        say(f"random heads: {selection}")
    else:
        say("step 1: selecting heads (a scale on every head, L1 penalty)")
        selection = select_heads(base, tokenizer, data.train, **count, l1=settings["l1"], lr=settings["select_lr"],
                                 epochs=settings["select_epochs"], **train_kw)
        source = "selected"
        say(f"selected: {selection}")
    selection.settings.setdefault("task", task)
    timing["select_s"] = time.perf_counter() - t0

    say(f"step 2: tuning offsets on {selection.k} heads")
    t0 = time.perf_counter()
    reft_model = tune_offsets(base, selection, data.train, tokenizer=tokenizer, lr=settings["lr"],
                              epochs=settings["epochs"], **train_kw)
    timing["offsets_s"] = time.perf_counter() - t0
    try:
        say("evaluating")
        scores = evaluate_task(task, reft_model, tokenizer, data.eval_rows, progress=progress,
                               max_new_tokens=settings["max_new_tokens"])
        timing["eval_s"] = scores["eval_s"]
        timing["total_s"] = time.perf_counter() - start
        result.update({
            "metrics": scores["metrics"], "eval_split": eval_split, "n_eval": scores["n"],
            "trainable_parameters": reft_model.count_parameters(),
            "heads": {"source": source, "k": selection.k, "total": selection.scores.numel(),
                      "selected": [list(h) for h in selection.heads], **count},
            "timing": timing,
            "hyperparameters": {**settings, "objective": spec.objective, "seed": seed, "device": device,
                                "dtype": DTYPE_ALIASES[dtype]},
            "data": {"data_dir": str(data.data_dir), "n_train": len(data.train), "max_train": max_train,
                     "max_eval": max_eval},
            "files": {},
            "per_example": scores["per_example"],
        })
        if output_dir is not None:
            result["files"] = _write_outputs(Path(output_dir), reft_model, selection, result, plot, say)
    finally:
        reft_model.detach()
    say(summary_line(result))
    return result


def summary_line(result: dict[str, Any]) -> str:
    """``"truthfulqa: mc1 38.4 ± 2.4, mc2 61.1 ± 1.9 (n=409, 8 heads, 512 parameters)"``."""
    parts = [f"{name} {_pct(m)}" for name, m in result["metrics"].items()]
    return (f"{result['task']}: {', '.join(parts)} (n={result['n_eval']}, {result['heads']['k']} heads, "
            f"{result['trainable_parameters']:,} parameters)")


def _pct(metric: dict[str, Any]) -> str:
    if metric["value"] is None:
        return "n/a"
    err = "" if metric["stderr"] is None else f" ± {100 * metric['stderr']:.1f}"
    return f"{100 * metric['value']:.1f}{err}"


def results_markdown(result: dict[str, Any]) -> str:
    """``results.md``: the metrics with standard errors, the heads, the parameters and the settings."""
    spec = get_task_spec(result["task"])
    rows = [f"| {name} | {_pct(m)} |" + (f" {_pct(result['base_metrics'][name])} |" if "base_metrics" in result
                                           else "") for name, m in result["metrics"].items()]
    header = "| metric (%) | LoFiT |" + (" base model |" if "base_metrics" in result else "")
    heads = result["heads"]
    hp = result["hyperparameters"]
    lines = [
        f"# LoFiT on {spec.title}", "",
        f"Model `{result['model']}`, {result['n_eval']} {result['eval_split']} examples, "
        f"{result['data']['n_train']} training examples. Values are means ± one standard error.", "",
        header, "|---|---|" + ("---|" if "base_metrics" in result else ""), *rows, "",
        f"* Heads ({heads['source']}): {heads['k']} of {heads['total']}: "
        + ", ".join(f"({layer}, {head})" for layer, head in heads["selected"]),
        f"* Trainable parameters: {result['trainable_parameters']:,}",
        f"* Step 1 (head selection): {hp['select_epochs']} epochs, lr {hp['select_lr']}, L1 {hp['l1']}; step 2 "
        f"(offsets): {hp['epochs']} epochs, lr {hp['lr']}; batch {hp['batch_size']}, objective {hp['objective']}"
        + (f" (beta {hp['beta']})" if hp["objective"] == "dpo" else "") + f", seed {hp['seed']}, "
        f"{hp['device']}, {hp['dtype']}",
        "* Wall time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result["timing"].items()),
    ]
    return "\n".join(lines) + "\n"


def _write_outputs(folder: Path, reft_model: Any, selection: HeadSelection, result: dict[str, Any], plot: bool,
                   say: Callable[[str], None]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    reft_model.save_pretrained(folder)
    files = {"adapter": str(folder), "head_selection": str(selection.save(folder))}
    if plot:
        try:
            files["heatmap"] = str(selection.plot(folder / HEATMAP_NAME,
                                                  title=f"{result['task']}: top {selection.k} heads"))
        except MissingDependencyError as exc:
            say(f"no heatmap written: {exc}")
    files["results_json"] = str(folder / RESULTS_JSON)
    files["results_md"] = str(folder / RESULTS_MD)
    result["files"] = files
    atomic_write_bytes(folder / RESULTS_JSON, (json.dumps(result, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(folder / RESULTS_MD, results_markdown(result).encode())
    return files
