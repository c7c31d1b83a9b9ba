"""Loaders for the LoFiT benchmark splits (TruthfulQA, CLUTRR, MQuAKE) and the prompt formats used on them.

The data is not shipped with reftlib: it lives in a shared folder (``../shared/data`` next to the project
root by default, see :func:`find_data_dir`). Each loader returns a list of small dataclasses, and the
``*_sft_examples`` / :func:`truthfulqa_preference_pairs` helpers turn those into training examples.

Prompt conventions (shared by every helper here so that training and evaluation see the same text):

* every prompt ends **without** a trailing space and every answer starts **with** one, e.g.
  ``("Q: Can pigs fly?\\nA:", " No, pigs cannot fly")``. A word-initial space belongs to the word's
  token in most tokenizers, so this split keeps the answer tokens a clean continuation of the prompt;
* TruthfulQA: ``"Q: {question}\\nA:"`` (:data:`TRUTHFULQA_TEMPLATE`);
* CLUTRR: the story, then a question asking how the *second* person of the query is related to the
  *first*, then ``"Answer: {second} is {first}'s"``; the answer is the relation word
  (:data:`CLUTRR_TEMPLATE`, see :func:`clutrr_prompt`);
* MQuAKE: ``"Q: Imagine that {edited fact}. {question}\\nA:"``; the answer is the post-edit answer
  ``new_answer`` (:data:`MQUAKE_TEMPLATE`, see :func:`mquake_prompt`). These follow the LoFiT setup,
  with the ``"\\nA:"`` layout of TruthfulQA.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reftlib.errors import ReftConfigError, ReftError

__all__ = [
    "CLUTRR_TEMPLATE",
    "DATA_ENV_VAR",
    "MQUAKE_TEMPLATE",
    "SPLITS",
    "TRUTHFULQA_TEMPLATE",
    "ClutrrExample",
    "MquakeExample",
    "Rewrite",
    "TruthfulQAExample",
    "clutrr_prompt",
    "clutrr_sft_examples",
    "find_data_dir",
    "load_clutrr",
    "load_mquake",
    "load_truthfulqa",
    "mquake_prompt",
    "mquake_sft_examples",
    "truthfulqa_preference_pairs",
    "truthfulqa_prompt",
    "truthfulqa_sft_examples",
]

#: Environment variable naming the data folder (checked after an explicit ``path``).
DATA_ENV_VAR = "REFTLIB_DATA"

#: The split names every loader accepts.
SPLITS = ("train", "val", "test")

#: TruthfulQA prompt; the answer follows after a space.
TRUTHFULQA_TEMPLATE = "Q: {question}\nA:"

#: CLUTRR prompt. ``{first}``/``{second}`` are the two names of the query ``('first', 'second')`` and the
#: expected answer is the relation of ``second`` to ``first`` (``second`` is ``first``'s <relation>).
CLUTRR_TEMPLATE = (
    "Read the following story about a family.\n"
    "{story}\n"
    "Assume the relations in the story are true. How is {second} related to {first}?\n"
    "Answer: {second} is {first}'s"
)

#: MQuAKE prompt; ``{edits}`` is the edited fact(s) as a sentence without final period.
MQUAKE_TEMPLATE = "Q: Imagine that {edits}. {question}\nA:"

# src/reftlib/evaluation/data.py -> parents[3] is the project root in a source checkout.
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------------
# locating the data
# --------------------------------------------------------------------------------------------------
def _candidate_dirs() -> list[Path]:
    """Default places to look for the data, in order: next to the project root found from the current
    working directory (the directory itself and every ancestor holding a ``pyproject.toml``), then next
    to the project root this file belongs to."""
    cwd = Path.cwd().resolve()
    roots = [cwd] + [p for p in cwd.parents if (p / "pyproject.toml").is_file()]
    roots.append(_PACKAGE_ROOT)
    seen: list[Path] = []
    for root in roots:
        cand = root.parent / "shared" / "data"
        if cand not in seen:
            seen.append(cand)
    return seen


def find_data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder holding the benchmark data (``truthfulqa/``, ``clutrr/``, ``mquake/``).

    Looked up, in order:

    1. ``path`` when given (an explicit path that does not exist is an error: no silent fallback);
    2. the environment variable ``REFTLIB_DATA`` when set (same rule);
    3. ``<project root>/../shared/data`` where the project root is the current working directory or an
       ancestor of it containing ``pyproject.toml``, or the checkout this module lives in.

    Raises:
        ReftError: when no folder is found; the message lists every path tried and how to pass one.
    """
    hint = (
        f"Pass the folder explicitly (e.g. load_truthfulqa('test', data_dir='/path/to/data')) or set the "
        f"environment variable {DATA_ENV_VAR}=/path/to/data."
    )
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ReftError(f"Benchmark data folder {str(p)!r} (passed explicitly) does not exist. {hint}")
        return p
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ReftError(f"Benchmark data folder {str(p)!r} (from ${DATA_ENV_VAR}) does not exist. {hint}")
        return p
    tried = _candidate_dirs()
    for cand in tried:
        if cand.is_dir():
            return cand
    listed = ", ".join(repr(str(c)) for c in tried)
    raise ReftError(
        f"Could not find the benchmark data folder: {DATA_ENV_VAR} is not set and none of the default "
        f"locations exists (tried {listed}). {hint}"
    )


def _split_file(split: str, data_dir: str | os.PathLike[str] | None, sub: str, pattern: str) -> Path:
    """Validate ``split`` and return the existing file ``<data dir>/<sub>/<pattern.format(split)>``."""
    if split not in SPLITS:
        raise ReftConfigError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    file = find_data_dir(data_dir) / sub / pattern.format(split=split)
    if not file.is_file():
        raise ReftError(
            f"Missing data file {str(file)!r}. The data folder should contain {sub}/{pattern.format(split='<split>')} "
            f"for the splits {', '.join(SPLITS)}; pass the right folder as data_dir or set {DATA_ENV_VAR}."
        )
    return file


def _split_answers(text: str | None) -> list[str]:
    """Split a ``; ``-separated answer list, dropping the empty items left by trailing semicolons."""
    return [a.strip() for a in (text or "").split(";") if a.strip()]


# --------------------------------------------------------------------------------------------------
# TruthfulQA
# --------------------------------------------------------------------------------------------------
@dataclass
class TruthfulQAExample:
    """One TruthfulQA question with its reference answers (taken verbatim from the CSV, no added period).

    ``correct_answers`` normally contains ``best_answer``; :func:`reftlib.evaluation.truthfulqa_mc`
    adds it when it does not.
    """

    question: str
    best_answer: str
    correct_answers: list[str]
    incorrect_answers: list[str]
    category: str = ""
    type: str = ""

    @property
    def prompt(self) -> str:
        """The prompt ``"Q: {question}\\nA:"`` (answers are appended after a space)."""
        return truthfulqa_prompt(self.question)


def truthfulqa_prompt(question: str, template: str = TRUTHFULQA_TEMPLATE) -> str:
    """Format a TruthfulQA question as a prompt (default ``"Q: {question}\\nA:"``)."""
    return template.format(question=question)


def load_truthfulqa(split: str, data_dir: str | os.PathLike[str] | None = None) -> list[TruthfulQAExample]:
    """Load TruthfulQA fold 0 (seed 42, the ITI/LoFiT two-fold split): ``train`` 326, ``val`` 82,
    ``test`` 409 questions, read from ``truthfulqa/fold_0_{split}_seed_42.csv``.

    Answer lists are split on ``;`` and stripped; empty items (trailing semicolons) are dropped.
    """
    file = _split_file(split, data_dir, "truthfulqa", "fold_0_{split}_seed_42.csv")
    rows: list[TruthfulQAExample] = []
    with file.open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            rows.append(
                TruthfulQAExample(
                    question=rec["Question"].strip(),
                    best_answer=rec["Best Answer"].strip(),
                    correct_answers=_split_answers(rec["Correct Answers"]),
                    incorrect_answers=_split_answers(rec["Incorrect Answers"]),
                    category=(rec.get("Category") or "").strip(),
                    type=(rec.get("Type") or "").strip(),
                )
            )
    return rows


def truthfulqa_preference_pairs(
    rows: Sequence[TruthfulQAExample], template: str = TRUTHFULQA_TEMPLATE
) -> list[tuple[str, str, str]]:
    """Preference triples ``(prompt, chosen, rejected)`` for DPO-style training.

    ``chosen`` is always the best answer and ``rejected`` runs over the incorrect answers: one pair per
    incorrect answer, in CSV order, so a question with *k* incorrect answers gives *k* pairs. Both
    answers carry a leading space (``" " + answer``).
    """
    pairs: list[tuple[str, str, str]] = []
    for row in rows:
        prompt = truthfulqa_prompt(row.question, template)
        pairs.extend((prompt, " " + row.best_answer, " " + bad) for bad in row.incorrect_answers)
    return pairs


def truthfulqa_sft_examples(
    rows: Sequence[TruthfulQAExample], template: str = TRUTHFULQA_TEMPLATE
) -> list[tuple[str, str]]:
    """Supervised pairs ``(prompt, " " + best_answer)``, one per question."""
    return [(truthfulqa_prompt(row.question, template), " " + row.best_answer) for row in rows]


# --------------------------------------------------------------------------------------------------
# CLUTRR
# --------------------------------------------------------------------------------------------------
@dataclass
class ClutrrExample:
    """One CLUTRR kinship question.

    ``query`` is ``(first, second)`` and ``target`` is the relation of ``second`` to ``first``: in
    ``"[Herman] asked his son, [James], ... sent his wife, [Rosalee]"`` with query
    ``('Herman', 'Rosalee')`` the target is ``"daughter-in-law"`` (Rosalee is Herman's daughter-in-law).
    ``story`` is the dataset's ``clean_story`` (the facts in chain order, as LoFiT used) with the
    ``[...]`` name brackets removed.
    """

    story: str
    query: tuple[str, str]
    target: str
    prompt: str
    id: str = ""


def clutrr_prompt(story: str, query: tuple[str, str], template: str = CLUTRR_TEMPLATE) -> str:
    """Prompt asking how ``query[1]`` is related to ``query[0]``, ending with ``"{second} is {first}'s"``.

    Example (default template)::

        Read the following story about a family.
        Herman asked his son, James, to go grocery shopping for him. ...
        Assume the relations in the story are true. How is Rosalee related to Herman?
        Answer: Rosalee is Herman's

    and the expected continuation is ``" daughter-in-law"``.
    """
    first, second = query
    return template.format(story=story, first=first, second=second)


def _parse_query(text: str) -> tuple[str, str]:
    """Parse the dataset's ``"('A', 'B')"`` query string into ``("A", "B")``."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ReftError(f"Malformed CLUTRR query {text!r}: expected a string like \"('A', 'B')\".") from exc
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ReftError(f"Malformed CLUTRR query {text!r}: expected a pair of names like \"('A', 'B')\".")
    return value[0].strip(), value[1].strip()


def load_clutrr(
    split: str, data_dir: str | os.PathLike[str] | None = None, template: str = CLUTRR_TEMPLATE
) -> list[ClutrrExample]:
    """Load CLUTRR (task 1.2, LoFiT split) from ``clutrr/{split}.json``: ``train`` 3151, ``val`` 450,
    ``test`` 450 examples. The ``prompt`` field is built with :func:`clutrr_prompt` and ``template``."""
    file = _split_file(split, data_dir, "clutrr", "{split}.json")
    with file.open(encoding="utf-8") as f:
        records = json.load(f)
    rows: list[ClutrrExample] = []
    for rec in records:
        story = (rec.get("clean_story") or rec["story"]).replace("[", "").replace("]", "").strip()
        query = _parse_query(rec["query"])
        rows.append(
            ClutrrExample(
                story=story,
                query=query,
                target=rec["target_text"].strip(),
                prompt=clutrr_prompt(story, query, template),
                id=str(rec.get("id", "")),
            )
        )
    return rows


def clutrr_sft_examples(rows: Sequence[ClutrrExample]) -> list[tuple[str, str]]:
    """Supervised pairs ``(prompt, " " + relation)``, one per example."""
    return [(row.prompt, " " + row.target) for row in rows]


# --------------------------------------------------------------------------------------------------
# MQuAKE
# --------------------------------------------------------------------------------------------------
@dataclass
class Rewrite:
    """One requested knowledge edit: ``prompt.format(subject)`` + target, e.g.
    ``"The name of the current head of the Nigeria government is"`` + ``"Karl Döhler"``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str
    question: str = ""

    def statement(self, new: bool = True) -> str:
        """The edited (``new=True``) or original fact as a sentence without final period."""
        target = self.target_new if new else self.target_true
        return f"{self.prompt.format(self.subject)} {target}"


@dataclass
class MquakeExample:
    """One MQuAKE-CF multi-hop case.

    ``answer``/``aliases`` are the answer *after* the edits (``new_answer``/``new_answer_alias``), the
    quantity LoFiT trains and evaluates; the pre-edit answer is kept in ``original_answer`` /
    ``original_aliases``. ``prompts`` holds one prompt per paraphrased question (see
    :func:`mquake_prompt`); ``prompt`` is the first, which LoFiT uses.
    """

    questions: list[str]
    answer: str
    aliases: list[str]
    requested_rewrites: list[Rewrite]
    prompts: list[str]
    original_answer: str = ""
    original_aliases: list[str] = field(default_factory=list)
    case_id: int | None = None

    @property
    def prompt(self) -> str:
        """The prompt of the first question."""
        return self.prompts[0]

    @property
    def references(self) -> list[str]:
        """Every accepted answer string: ``[answer, *aliases]``."""
        return [self.answer, *self.aliases]


def mquake_prompt(question: str, rewrites: Sequence[Rewrite], template: str = MQUAKE_TEMPLATE) -> str:
    """``"Q: Imagine that {edit}. {question}\\nA:"``; several edits are joined with ``" and that "``.

    Example: ``"Q: Imagine that The name of the current head of the Nigeria government is Karl Döhler.
    Who was the head of government of the country where Ahmadu Bello was a citizen?\\nA:"``.
    """
    edits = " and that ".join(r.statement(new=True) for r in rewrites)
    return template.format(edits=edits, question=question)


def load_mquake(
    split: str, data_dir: str | os.PathLike[str] | None = None, template: str = MQUAKE_TEMPLATE
) -> list[MquakeExample]:
    """Load MQuAKE-CF (LoFiT split) from ``mquake/{split}.jsonl``: ``train`` 134, ``val`` 95, ``test``
    864 cases, each with three paraphrased questions and one requested edit."""
    file = _split_file(split, data_dir, "mquake", "{split}.jsonl")
    rows: list[MquakeExample] = []
    with file.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            rewrites = [
                Rewrite(
                    prompt=rw["prompt"],
                    subject=rw["subject"],
                    target_new=rw["target_new"]["str"],
                    target_true=rw["target_true"]["str"],
                    question=rw.get("question", ""),
                )
                for rw in rec["requested_rewrite"]
            ]
            questions = list(rec["questions"])
            rows.append(
                MquakeExample(
                    questions=questions,
                    answer=rec["new_answer"].strip(),
                    aliases=[a.strip() for a in rec.get("new_answer_alias", [])],
                    requested_rewrites=rewrites,
                    prompts=[mquake_prompt(q, rewrites, template) for q in questions],
                    original_answer=rec.get("answer", "").strip(),
                    original_aliases=[a.strip() for a in rec.get("answer_alias", [])],
                    case_id=rec.get("case_id"),
                )
            )
    return rows


def mquake_sft_examples(rows: Sequence[MquakeExample], all_questions: bool = False) -> list[tuple[str, str]]:
    """Supervised pairs ``(prompt, " " + new_answer)``.

    By default one pair per case from its first question (as LoFiT); ``all_questions=True`` gives one
    pair per paraphrased question.
    """
    out: list[tuple[str, str]] = []
    for row in rows:
        prompts = row.prompts if all_questions else row.prompts[:1]
        out.extend((p, " " + row.answer) for p in prompts)
    return out
