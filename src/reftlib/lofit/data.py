"""Training data for the LoFiT recipe: (prompt, answer) pairs or (prompt, chosen, rejected) triples.

:func:`select_heads` and :func:`tune_offsets` take ``train_data`` in one of two forms and pick
the loss from it (or from an explicit ``objective``):

* ``[(prompt, answer), ...]``: supervised next-token cross-entropy on the answer tokens
  (``objective="sft"``; LoFiT's setting for CLUTRR and MQuAKE);
* ``[(prompt, chosen, rejected), ...]``: DPO on the preference pairs (``objective="dpo"``;
  LoFiT's setting for TruthfulQA). ``objective="sft"`` on triples trains on ``(prompt, chosen)``.

Dicts with keys ``prompt`` + ``answer`` (or ``output``/``completion``) or ``prompt`` + ``chosen``
+ ``rejected`` are accepted too, so a ``datasets.Dataset`` can be passed as is.

Tokenization is the one of :func:`reftlib.training.make_supervised_examples` (prompt with its
leading special tokens, answer without, labels ``-100`` on the prompt), so every trainer in
reftlib sees the same examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ..checks import require_model, require_tokenizer
from ..errors import InputError, ReftConfigError
from ..model import ReftModel
from ..training.data import make_supervised_examples

Objective = Literal["sft", "dpo"]

_ANSWER_KEYS = ("answer", "output", "completion", "response")

__all__ = ["Objective", "make_sft_dataset", "normalize_train_data", "resolve_objective"]


def _row_of(item: Any, index: int) -> tuple[str, ...]:
    if isinstance(item, Mapping):
        if "prompt" not in item:
            raise InputError(f"train_data[{index}] is a dict without a 'prompt' key (keys: {sorted(item)})")
        if "chosen" in item and "rejected" in item:
            return (item["prompt"], item["chosen"], item["rejected"])
        for key in _ANSWER_KEYS:
            if key in item:
                return (item["prompt"], item[key])
        raise InputError(
            f"train_data[{index}] has keys {sorted(item)}; give 'prompt' with 'answer' (supervised) or "
            "'prompt' with 'chosen' and 'rejected' (preference)"
        )
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
        raise InputError(
            f"train_data[{index}] is {item!r}; each example must be a (prompt, answer) pair or a "
            "(prompt, chosen, rejected) triple"
        )
    return tuple(item)


def normalize_train_data(train_data: Iterable[Any]) -> tuple[Literal["pairs", "triples"], list[tuple[str, ...]]]:
    """Read ``train_data`` into a list of tuples and say whether they are pairs or triples.

    Raises :class:`~reftlib.errors.InputError` on empty data, mixed forms, or non-string fields.
    """
    if train_data is None or isinstance(train_data, (str, bytes)):
        raise InputError("train_data must be a list of (prompt, answer) pairs or (prompt, chosen, rejected) triples")
    rows = [_row_of(item, i) for i, item in enumerate(train_data)]
    if not rows:
        raise InputError("train_data is empty; pass at least one example")
    sizes = {len(r) for r in rows}
    if sizes - {2, 3} or len(sizes) != 1:
        raise InputError(
            f"train_data mixes or misuses forms (tuple sizes {sorted(sizes)}); use only (prompt, answer) pairs "
            "or only (prompt, chosen, rejected) triples"
        )
    for i, row in enumerate(rows):
        for field in row:
            if not isinstance(field, str):
                raise InputError(f"train_data[{i}] contains {field!r}; prompts and answers must be strings")
    return ("pairs" if sizes == {2} else "triples"), rows


def resolve_objective(kind: str, objective: str | None) -> Objective:
    """The loss to train with: ``objective`` when given (checked against the data), else from the data."""
    if objective is None:
        return "dpo" if kind == "triples" else "sft"
    if objective not in ("sft", "dpo"):
        raise ReftConfigError(f"objective must be 'sft', 'dpo' or None (chosen from the data), got {objective!r}")
    if objective == "dpo" and kind != "triples":
        raise InputError(
            "objective='dpo' needs (prompt, chosen, rejected) triples, but train_data holds (prompt, answer) pairs"
        )
    return objective  # type: ignore[return-value]


def base_model(model: Any) -> Any:
    """The Hugging Face model inside a :class:`~reftlib.ReftModel` (for its config), else ``model``."""
    return model.model if isinstance(model, ReftModel) else model


def make_sft_dataset(
    tokenizer: Any,
    rows: Sequence[Sequence[str]],
    *,
    positions: str | None = None,
    num_interventions: int = 1,
    nonstop: bool = False,
    max_length: int | None = None,
    model: Any = None,
):
    """A ``datasets.Dataset`` with ``input_ids`` and ``labels`` (and ``intervention_locations``).

    ``rows`` are ``(prompt, answer, ...)``; only the first two fields are used. With
    ``positions=None`` the examples carry no positions, so interventions whose config has
    ``positions=None`` act on *every* token (prompt and answer): LoFiT's setting. A spec such as
    ``"l1"`` stores prompt positions for every intervention (LoReFT's setting). ``model`` (or a
    ReftModel on it) only sets the default ``max_length``.
    """
    import datasets

    require_tokenizer(tokenizer, "tokenizer", "make_sft_dataset")
    require_model(model, "model", "make_sft_dataset", optional=True, allow_reft_model=True)
    columns = make_supervised_examples(
        tokenizer, [r[0] for r in rows], [r[1] for r in rows], positions or "l1",
        num_interventions=num_interventions, nonstop=nonstop, max_length=max_length, model=base_model(model),
        share_weights=True,
    )
    if positions is None:
        del columns["intervention_locations"]
    return datasets.Dataset.from_dict(columns)
