"""The three LoFiT tasks as data: their files, training examples, default settings and evaluation.

:func:`~reftlib.lofit.run_lofit_task` runs one task end to end; this module holds what differs per
task, so that the pipeline, the command line (``reftlib lofit TASK``) and the benchmark scripts all
build the same training examples and score the same way:

================  =====================================  =========================================
task              training examples (loss)               evaluation
================  =====================================  =========================================
``truthfulqa``    one DPO triple per question: best      MC1 / MC2 (:func:`~reftlib.evaluation.truthfulqa_mc`)
                  answer vs. one incorrect answer drawn
                  with the seed
``clutrr``        ``(story prompt, " " + relation)``     exact match of the greedy answer
                  (cross-entropy)                        (case-insensitive, first line, stripped)
``mquake``        ``(edit + first question, " " +        exact match against the post-edit answer
                  new answer)`` (cross-entropy)          or any of its aliases (case-insensitive)
================  =====================================  =========================================

Every metric comes with its standard error over the evaluated examples (``std / sqrt(n)``, with the
sample standard deviation), so a difference between two runs can be read against it.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReftConfigError, ReftError
from ..evaluation import (
    SPLITS,
    clutrr_sft_examples,
    exact_match_generate,
    find_data_dir,
    load_clutrr,
    load_mquake,
    load_truthfulqa,
    mquake_sft_examples,
    truthfulqa_mc,
)

__all__ = [
    "TASKS",
    "TaskData",
    "TaskSpec",
    "check_task_data",
    "evaluate_task",
    "get_task_spec",
    "load_task_data",
    "mean_and_stderr",
    "truthfulqa_dpo_pairs",
]


@dataclass(frozen=True)
class TaskSpec:
    """What one LoFiT task uses: its data files and the default settings of both LoFiT steps.

    The defaults are those of ``benchmarks/lofit_truthfulqa.py`` and ``benchmarks/lofit_exact_match.py``
    (see ``docs/lofit_results.md``); MQuAKE reuses CLUTRR's, untuned.
    """

    name: str
    title: str
    folder: str
    file_pattern: str  # one file per split, ``{split}`` filled in
    objective: str  # "dpo" or "sft"
    metrics: tuple[str, ...]
    train_subset: str  # "first": the first N training rows; "sample": N rows drawn with the seed
    select_epochs: float = 2
    select_lr: float = 5e-3
    l1: float = 1e-3
    epochs: float = 3
    lr: float = 2e-2
    batch_size: int = 8
    beta: float = 0.1
    max_new_tokens: int = 8

    def files(self) -> list[str]:
        """The files the task needs, relative to the data folder (one per split)."""
        return [f"{self.folder}/{self.file_pattern.format(split=s)}" for s in SPLITS]

    def defaults(self) -> dict[str, Any]:
        """The tunable settings as a dict (the keys ``run_lofit_task`` accepts as overrides)."""
        return {"select_epochs": self.select_epochs, "select_lr": self.select_lr, "l1": self.l1,
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "beta": self.beta,
                "max_new_tokens": self.max_new_tokens}


_SPECS = {
    "truthfulqa": TaskSpec("truthfulqa", "TruthfulQA (fold 0)", "truthfulqa", "fold_0_{split}_seed_42.csv", "dpo",
                           ("mc1", "mc2"), "first", lr=3e-2),
    "clutrr": TaskSpec("clutrr", "CLUTRR", "clutrr", "{split}.json", "sft", ("exact_match",), "sample"),
    "mquake": TaskSpec("mquake", "MQuAKE-CF", "mquake", "{split}.jsonl", "sft", ("exact_match",), "sample",
                       max_new_tokens=16),
}

#: The task names :func:`~reftlib.lofit.run_lofit_task` and ``reftlib lofit`` accept.
TASKS: tuple[str, ...] = tuple(_SPECS)


def get_task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``; an unknown name raises a ``ReftConfigError`` listing the tasks."""
    if task not in _SPECS:
        raise ReftConfigError(f"unknown LoFiT task {task!r}; choose one of {', '.join(TASKS)}")
    return _SPECS[task]


def check_task_data(task: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder for ``task`` after checking that every file the task needs is there.

    Raises:
        ReftConfigError: naming the folder, the expected files and how to point at another folder.
    """
    spec = get_task_spec(task)
    expected = ", ".join(spec.files())
    try:
        folder = find_data_dir(data_dir)
    except ReftError as exc:
        raise ReftConfigError(f"{spec.title} data not found: {exc} The folder must hold {expected}.") from None
    missing = [name for name in spec.files() if not (folder / name).is_file()]
    if missing:
        raise ReftConfigError(
            f"{spec.title} data is incomplete in {str(folder)!r}: missing {', '.join(missing)}. The data folder "
            f"must hold {expected} (pass it with data_dir= / --data DIR, or set REFTLIB_DATA)."
        )
    return folder


def truthfulqa_dpo_pairs(rows: Sequence[Any], seed: int) -> list[tuple[str, str, str]]:
    """One ``(prompt, " " + best answer, " " + incorrect answer)`` triple per question.

    The incorrect answer is drawn with ``random.Random(seed)``, question after question, so the pairs
    depend only on the rows and the seed.
    """
    rng = random.Random(seed)
    return [(row.prompt, " " + row.best_answer, " " + rng.choice(row.incorrect_answers)) for row in rows]


@dataclass
class TaskData:
    """The training examples and evaluation rows of one task (see :func:`load_task_data`)."""

    task: str
    train: list[tuple[str, ...]]
    eval_rows: list[Any]
    eval_split: str
    data_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _check_limit(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ReftConfigError(f"{name} must be a positive number of examples or None (all), got {value!r}")


def load_task_data(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    eval_split: str = "test",
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 42,
) -> TaskData:
    """Load ``task``'s training examples and its ``eval_split`` rows (``"val"`` or ``"test"``).

    ``max_train`` keeps the first N training rows (TruthfulQA: its fold is already a random split)
    or N rows drawn with ``seed`` (CLUTRR, MQuAKE: as ``benchmarks/lofit_exact_match.py``); ``max_eval``
    keeps the first N evaluation rows. ``None`` keeps everything.
    """
    spec = get_task_spec(task)
    if eval_split not in ("val", "test"):
        raise ReftConfigError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    _check_limit(max_train, "max_train")
    _check_limit(max_eval, "max_eval")
    folder = check_task_data(task, data_dir)
    loader = {"truthfulqa": load_truthfulqa, "clutrr": load_clutrr, "mquake": load_mquake}[task]
    train_rows = loader("train", folder)
    eval_rows = loader(eval_split, folder)
    if max_train is not None and max_train < len(train_rows):
        if spec.train_subset == "sample":
            train_rows = random.Random(seed).sample(train_rows, max_train)
        else:
            train_rows = train_rows[:max_train]
    if max_eval is not None:
        eval_rows = eval_rows[:max_eval]
    if task == "truthfulqa":
        train = truthfulqa_dpo_pairs(train_rows, seed)
    elif task == "clutrr":
        train = clutrr_sft_examples(train_rows)
    else:
        train = mquake_sft_examples(train_rows)
    return TaskData(task, list(train), list(eval_rows), eval_split, folder)


def mean_and_stderr(values: Sequence[float]) -> dict[str, Any]:
    """``{"value": mean, "stderr": std / sqrt(n), "n": n}`` (sample std; ``stderr`` is None below 2 values)."""
    n = len(values)
    if n == 0:
        return {"value": None, "stderr": None, "n": 0}
    mean = math.fsum(values) / n
    if n < 2:
        return {"value": mean, "stderr": None, "n": n}
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(variance / n), "n": n}


def evaluate_task(
    task: str,
    model: Any,
    tokenizer: Any,
    rows: Sequence[Any],
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` (a base model or a ``ReftModel``) on ``rows`` of ``task``.

    Returns ``{"metrics": {name: {"value", "stderr", "n"}}, "n", "eval_s", "per_example"}``;
    ``per_example`` holds one dict per row (TruthfulQA: ``mc1``, ``mc2``; the others: ``prediction``,
    ``correct``), so two models can be compared example by example.
    """
    spec = get_task_spec(task)
    start = time.perf_counter()
    if task == "truthfulqa":
        out = truthfulqa_mc(model, tokenizer, list(rows), batch_size=batch_size, details=True, progress=progress)
        per_example = [{"mc1": q["mc1"], "mc2": q["mc2"]} for q in out["details"]]
        metrics = {name: mean_and_stderr([q[name] for q in per_example]) for name in ("mc1", "mc2")}
    else:
        aliases = [list(r.aliases) for r in rows] if task == "mquake" else None
        references = [r.answer if task == "mquake" else r.target for r in rows]
        out = exact_match_generate(model, tokenizer, [r.prompt for r in rows], references,
                                   max_new_tokens=max_new_tokens or spec.max_new_tokens, batch_size=batch_size,
                                   aliases=aliases, ignore_case=True, progress=progress)
        per_example = [{"prediction": p, "correct": c} for p, c in zip(out["predictions"], out["correct"])]
        metrics = {"exact_match": mean_and_stderr([float(c) for c in out["correct"]])}
    return {"metrics": metrics, "n": len(per_example), "eval_s": time.perf_counter() - start,
            "per_example": per_example}
