"""Data modules for ReFT training: tokenized examples with intervention positions, and their collator.

The builders keep pyreft's names and arguments (``make_last_position_supervised_data_module``,
``make_multiple_position_supervised_data_module``) and return the same dict
(``train_dataset``, ``eval_dataset``, ``data_collator``), with one precise meaning for every
position, and explicit errors instead of silent corruption.

How an example is built
-----------------------
* **Tokenization.** The prompt is tokenized with the tokenizer's *leading* special tokens only
  (e.g. BOS; never a trailing SEP/EOS between prompt and answer), the output without any special
  tokens, and the two id lists are concatenated; EOS is appended unless ``nonstop``. Tokenizing
  the two parts separately fixes the prompt/output boundary exactly (tokenizing the joined text
  can merge characters across it). A prompt that already starts with the BOS text (e.g. from a
  chat template) is not given a second BOS.
* **Labels** are ``-100`` on every prompt token and the token ids on the output (and EOS).
* **Positions** (``intervention_locations``, ``[num_interventions, n_positions]``) index the
  example's ids and always fall on *prompt* tokens; ``-1`` marks padding. ``"l1"`` is the last
  prompt token, ``"f3"`` the first three, ``"f7+l7"`` the first seven and the last seven, where a
  token already covered by the ``f`` part is not repeated in the ``l`` part when one intervention
  gets both (short prompts get ``-1`` entries, never duplicates and never a "sink" token). This is the same rule as
  :func:`reftlib.resolve_position_spec`, which computes them.
* **Weight sharing** (pyreft's convention, which pairs with configs listing the layers twice):
  with ``share_weights=False`` and a spec with both parts, the first half of the interventions
  gets the ``f`` positions and the second half the ``l`` positions (``num_interventions`` must
  be even), each half resolved on its own exactly as its saved spec is at generation; with
  ``share_weights=True`` every intervention gets ``f`` + ``l``.
  :func:`split_position_spec` states this rule for everything else that needs it.
* **Length.** Examples longer than ``max_length`` (default: ``tokenizer.model_max_length``
  capped at the model's ``max_position_embeddings``) lose output tokens first (EOS included).
  When the prompt alone does not fit (it needs ``max_length - 1`` tokens at most, so that at
  least one output token is supervised), ``long_prompt="error"`` (default) raises an
  :class:`~reftlib.errors.InputError` naming the example; ``long_prompt="truncate_left"`` keeps
  the leading special tokens and the *end* of the prompt (positions are computed on what is kept).

:class:`~reftlib.training.collator.ReftDataCollator` (in :mod:`reftlib.training.collator`,
importable from here too) pads a batch; the builders return one as ``data_collator``. Prompt
tokenization is shared with generation (:func:`reftlib.generation.encode_prompts`), so that a
position such as ``"l1"`` means the same token when the trained interventions generate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from ..checks import require_model, require_tokenizer
from ..errors import InputError, PositionError
from ..generation import encode_prompts
from ..inputs import max_positions
from ..model import ReftModel
from ..positions import parse_position_spec, resolve_position_spec, split_position_spec
from .classification import ReftModelForSequenceClassification, default_pooling
from .collator import IGNORE_INDEX, ReftDataCollator

logger = logging.getLogger(__name__)

_PAD_POSITION = -1  # an unused position slot (reftlib.positions' convention)
_CHUNK = 4096  # examples per vectorized position computation

LongPrompt = Literal["error", "truncate_left"]
Positions = str | Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]]

__all__ = [
    "IGNORE_INDEX",
    "ReftDataCollator",
    "apply_chat_template",
    "default_max_length",
    "make_classification_data_module",
    "make_last_position_supervised_data_module",
    "make_multiple_position_supervised_data_module",
    "make_supervised_examples",
    "split_position_spec",
]


# --------------------------------------------------------------------------- inputs
def _as_list(values: Any, name: str) -> list[Any]:
    """A plain list from a list/tuple, a ``datasets`` column, a pandas Series or a numpy array."""
    if values is None:
        raise InputError(f"{name} is None; pass a list of strings (or a datasets column / pandas Series)")
    if isinstance(values, (str, bytes)):
        raise InputError(f"{name} must be a list of strings, got a single string; wrap it in a list: [{name}]")
    if hasattr(values, "tolist") and not isinstance(values, torch.Tensor):
        return list(values.tolist())  # pandas Series (positional, not by index label) and numpy arrays
    try:
        return list(values)
    except TypeError as exc:
        raise InputError(f"{name} must be a sequence, got {type(values).__name__}") from exc


def _check_texts(texts: list[Any], name: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{name}[{i}] is a {type(text).__name__}, not a string ({text!r})")


def apply_chat_template(tokenizer: Any, prompts: Iterable[str], *, system_prompt: str | None = None,
                        **template_kwargs: Any) -> list[str]:
    """Wrap each prompt as a user turn (after an optional system turn) and add the generation prompt.

    Returns the templated *strings*, ready to be passed as ``inputs`` to the data-module builders
    (which will not add a second BOS when the template already starts with it).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("this tokenizer has no chat_template; set tokenizer.chat_template or pass plain prompts")
    result = []
    for prompt in _as_list(prompts, "prompts"):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
        result.append(text)
    return result


# --------------------------------------------------------------------------- tokenization
def _ids_of(encoded: Any) -> list[list[int]]:
    ids = encoded["input_ids"]
    return [list(row) for row in ids]


def default_max_length(tokenizer: Any, model: Any = None) -> int:
    """``tokenizer.model_max_length`` capped at the model's ``max_position_embeddings`` (when known)."""
    limit = getattr(tokenizer, "model_max_length", None)
    limit = int(limit) if isinstance(limit, int) and 0 < limit < 10**9 else None
    positions = max_positions(model) if model is not None else None
    if positions is not None:
        limit = positions if limit is None else min(limit, positions)
    if limit is None:
        raise InputError(
            "cannot tell the maximum sequence length (tokenizer.model_max_length is unset and the model config has "
            "no max_position_embeddings); pass max_length="
        )
    return limit


# --------------------------------------------------------------------------- positions
def _spec_columns(spec: str, prompt_lengths: list[int]) -> tuple[torch.Tensor | None, int, int]:
    """Positions ``[n_examples, n_first + n_last]`` for a spec, computed on each prompt's tokens."""
    parsed = parse_position_spec(spec)
    if parsed is None:
        return None, 0, 0
    n_first, n_last = parsed
    chunks = []
    for start in range(0, len(prompt_lengths), _CHUNK):
        lengths = torch.tensor(prompt_lengths[start:start + _CHUNK], dtype=torch.long)
        width = int(lengths.max()) if len(lengths) else 0
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        chunks.append(resolve_position_spec(spec, mask))
    if not chunks:
        return torch.empty(0, n_first + n_last, dtype=torch.long), n_first, n_last
    return torch.cat(chunks), n_first, n_last


def _pad_row(row: list[int], width: int) -> list[int]:
    return row + [_PAD_POSITION] * (width - len(row))


def _spec_locations(spec: str, prompt_lengths: list[int], num_interventions: int,
                    share_weights: bool) -> list[list[list[int]]]:
    """Per example ``[num_interventions][n_positions]`` for a position spec."""
    columns, n_first, n_last = _spec_columns(spec, prompt_lengths)
    if columns is None:  # "all": every prompt token
        width = max(prompt_lengths, default=0)
        return [[_pad_row(list(range(n)), width)] * num_interventions for n in prompt_lengths]
    halves = split_position_spec(spec, share_weights)
    if halves is None:
        return [[row] * num_interventions for row in columns.tolist()]
    if num_interventions % 2:
        raise PositionError(
            f"positions={spec!r} with share_weights=False gives the first half of the interventions the 'f' "
            f"positions and the second half the 'l' positions, so num_interventions must be even (got "
            f"{num_interventions}); list each layer twice in the config, or pass share_weights=True"
        )
    # Each half is resolved on its own, as the spec saved with each intervention ("f2", "l3") is at
    # generation: on a prompt shorter than n + m tokens both halves may cover the same token.
    (firsts, _, _), (lasts, _, _) = (_spec_columns(part, prompt_lengths) for part in halves)
    half, width = num_interventions // 2, max(n_first, n_last)
    return [[_pad_row(first, width)] * half + [_pad_row(last, width)] * half
            for first, last in zip(firsts.tolist(), lasts.tolist())]


def _explicit_locations(positions: Sequence[Any], prompt_lengths: list[int], num_interventions: int,
                        shifts: list[int], n_prefix: list[int]) -> list[list[list[int]]]:
    """Validate per-example index lists (``[n]`` or ``[num_interventions][n]`` per example)."""
    positions = _as_list(positions, "positions")
    if len(positions) != len(prompt_lengths):
        raise PositionError(
            f"positions has {len(positions)} entries but there are {len(prompt_lengths)} examples; give one list "
            "of prompt-token indices per example (or a spec such as 'f1+l1')"
        )
    result = []
    for i, entry in enumerate(positions):
        entry = entry.tolist() if hasattr(entry, "tolist") else list(entry)
        per_iv = entry if entry and isinstance(entry[0], (list, tuple)) else [entry] * num_interventions
        if len(per_iv) != num_interventions:
            raise PositionError(
                f"positions[{i}] has {len(per_iv)} lists but num_interventions={num_interventions}"
            )
        rows = []
        for row in per_iv:
            clean = []
            for p in row:
                if isinstance(p, bool) or not isinstance(p, int):
                    raise PositionError(f"positions[{i}] contains {p!r}; positions must be integer token indices")
                if p < _PAD_POSITION or p >= prompt_lengths[i] + shifts[i]:
                    raise PositionError(
                        f"positions[{i}] contains {p}, outside the prompt (it has {prompt_lengths[i] + shifts[i]} "
                        "tokens, indices from 0; -1 marks padding). Positions must fall on prompt tokens"
                    )
                if p >= 0 and shifts[i]:  # the prompt was truncated from the left
                    p = p if p < n_prefix[i] else (p - shifts[i] if p - shifts[i] >= n_prefix[i] else _PAD_POSITION)
                clean.append(p)
            real = [p for p in clean if p >= 0]
            if len(set(real)) != len(real):
                raise PositionError(f"positions[{i}] lists the same token twice ({row}); list each position once")
            rows.append(clean)
        result.append(rows)
    return result


# --------------------------------------------------------------------------- examples
def make_supervised_examples(
    tokenizer: Any,
    inputs: Any,
    outputs: Any,
    positions: Positions = "l1",
    *,
    num_interventions: int = 1,
    nonstop: bool = False,
    share_weights: bool = False,
    max_length: int | None = None,
    long_prompt: LongPrompt = "error",
    model: Any = None,
) -> dict[str, list]:
    """Columns ``input_ids``, ``labels``, ``intervention_locations`` for prompt/output pairs (see module doc).

    ``positions`` is a spec (``"l1"``, ``"f7+l7"``, ``"all"``) or, per example, a list of prompt-token
    indices (used for every intervention) or a list of such lists (one per intervention).
    """
    require_tokenizer(tokenizer, "tokenizer", "make_supervised_examples")
    require_model(model, "model", "make_supervised_examples", optional=True, allow_reft_model=True)
    prompts, answers = _as_list(inputs, "inputs"), _as_list(outputs, "outputs")
    if len(prompts) != len(answers):
        raise InputError(f"inputs has {len(prompts)} examples but outputs has {len(answers)}")
    if not prompts:
        raise InputError("inputs is empty; pass at least one example")
    _check_texts(prompts, "inputs")
    _check_texts(answers, "outputs")
    if not isinstance(num_interventions, int) or num_interventions < 1:
        raise InputError(f"num_interventions must be a positive integer, got {num_interventions!r}")
    if long_prompt not in ("error", "truncate_left"):
        raise InputError(f"long_prompt must be 'error' or 'truncate_left', got {long_prompt!r}")
    _check_model_interventions(model, num_interventions)
    max_length = default_max_length(tokenizer, model) if max_length is None else int(max_length)
    eos = getattr(tokenizer, "eos_token_id", None)
    if not nonstop and eos is None:
        raise InputError("the tokenizer has no eos_token; set tokenizer.eos_token or pass nonstop=True")

    prompt_ids, n_prefix, body_lengths = encode_prompts(tokenizer, prompts)
    output_ids = _ids_of(tokenizer(answers, add_special_tokens=False))
    shifts = [0] * len(prompts)
    all_ids, all_labels, prompt_lengths = [], [], []
    unsupervised = 0
    for i, (p_ids, o_ids) in enumerate(zip(prompt_ids, output_ids)):
        if body_lengths[i] == 0:
            raise InputError(
                f"prompt {i} is empty ({prompts[i]!r} has no tokens); interventions need at least one prompt token"
            )
        if not nonstop:
            o_ids = [*o_ids, eos]
        budget = max_length - (1 if o_ids else 0)  # keep at least one supervised token
        if len(p_ids) > budget:
            if long_prompt == "error":
                raise InputError(
                    f"prompt {i} has {len(p_ids)} tokens but max_length is {max_length} (the prompt may use at "
                    f"most {budget} so that one output token is left); shorten it, raise max_length, or pass "
                    "long_prompt='truncate_left' to keep the end of long prompts"
                )
            keep = budget - n_prefix[i]
            if keep < 1:
                raise InputError(f"max_length={max_length} leaves no room for prompt {i}; raise max_length")
            shifts[i] = len(p_ids) - budget
            p_ids = p_ids[:n_prefix[i]] + p_ids[n_prefix[i] + shifts[i]:]
        ids = (p_ids + o_ids)[:max_length]
        unsupervised += len(ids) == len(p_ids)
        all_ids.append(ids)
        all_labels.append([IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):])
        prompt_lengths.append(len(p_ids))
    if unsupervised:
        logger.warning("%d example(s) have no supervised output token (empty output with nonstop=True)", unsupervised)

    if isinstance(positions, str):
        locations = _spec_locations(positions, prompt_lengths, num_interventions, share_weights)
    else:
        locations = _explicit_locations(positions, prompt_lengths, num_interventions, shifts, n_prefix)
    return {"input_ids": all_ids, "labels": all_labels, "intervention_locations": locations}


def _check_model_interventions(model: Any, num_interventions: int) -> None:

    if isinstance(model, ReftModel):
        count = len(model.interventions)
        if count != num_interventions:
            raise InputError(
                f"the ReftModel has {count} active intervention(s) but num_interventions={num_interventions}; "
                "the positions need one row per intervention"
            )


def _dataset(columns: Mapping[str, list]):
    import datasets

    return datasets.Dataset.from_dict(dict(columns))


def make_last_position_supervised_data_module(
    tokenizer: Any,
    model: Any,
    inputs: Any,
    outputs: Any,
    num_interventions: int = 1,
    nonstop: bool = False,
    *,
    max_length: int | None = None,
    long_prompt: LongPrompt = "error",
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """Intervene on the last prompt token (pyreft's data module of the same name).

    Returns ``dict(train_dataset=datasets.Dataset, eval_dataset=None, data_collator=ReftDataCollator)``;
    pass it to a trainer with ``ReftTrainerForCausalLM(model=..., args=..., **data_module)``.
    """
    require_tokenizer(tokenizer, "tokenizer", "make_last_position_supervised_data_module")
    require_model(model, "model", "make_last_position_supervised_data_module", allow_reft_model=True)
    return make_multiple_position_supervised_data_module(
        tokenizer, model, inputs, outputs, positions="l1", num_interventions=num_interventions, nonstop=nonstop,
        share_weights=True, max_length=max_length, long_prompt=long_prompt, padding_side=padding_side,
    )


def make_multiple_position_supervised_data_module(
    tokenizer: Any,
    model: Any,
    inputs: Any,
    outputs: Any,
    positions: Positions = "f1+l1",
    num_interventions: int = 1,
    nonstop: bool = False,
    share_weights: bool = False,
    *,
    max_length: int | None = None,
    long_prompt: LongPrompt = "error",
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """Intervene on the prompt tokens chosen by ``positions`` (pyreft's data module of the same name).

    ``positions``: a spec (``"f7+l7"``, ``"l1"``, ``"all"``) or explicit prompt-token indices per
    example. See the module documentation for tokenization, weight sharing and truncation.
    """
    require_tokenizer(tokenizer, "tokenizer", "make_multiple_position_supervised_data_module")
    require_model(model, "model", "make_multiple_position_supervised_data_module", allow_reft_model=True)
    collator = ReftDataCollator(tokenizer=tokenizer, padding_side=padding_side)  # fails early without a pad token
    columns = make_supervised_examples(
        tokenizer, inputs, outputs, positions, num_interventions=num_interventions, nonstop=nonstop,
        share_weights=share_weights, max_length=max_length, long_prompt=long_prompt, model=model,
    )
    return {"train_dataset": _dataset(columns), "eval_dataset": None, "data_collator": collator}


def make_classification_data_module(
    tokenizer: Any,
    model: Any,
    inputs: Any,
    labels: Any,
    positions: Positions | None = None,
    num_interventions: int = 1,
    share_weights: bool = False,
    *,
    max_length: int | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """Examples for :class:`~reftlib.training.ReftTrainerForSequenceClassification`.

    Texts are tokenized with all of the tokenizer's special tokens (``[CLS] … [SEP]`` for
    encoders) and truncated on the right to ``max_length``. ``labels`` are class indices, floats
    (regression, ``num_labels=1``) or per-example lists of 0/1 (multi-label). ``positions``
    default to the token the classification head reads: ``"f1"`` when ``model`` pools the first
    token (its ``pooling``, or :func:`~reftlib.training.classification.default_pooling` for a plain
    model: encoders), ``"l1"`` otherwise (decoders, and mean pooling).
    """
    require_tokenizer(tokenizer, "tokenizer", "make_classification_data_module")
    require_model(model, "model", "make_classification_data_module", allow_reft_model=True)

    texts, targets = _as_list(inputs, "inputs"), _as_list(labels, "labels")
    if len(texts) != len(targets):
        raise InputError(f"inputs has {len(texts)} examples but labels has {len(targets)}")
    if not texts:
        raise InputError("inputs is empty; pass at least one example")
    _check_texts(texts, "inputs")
    _check_model_interventions(model, num_interventions)
    collator = ReftDataCollator(tokenizer=tokenizer, padding_side=padding_side, token_level_labels=False)
    max_length = default_max_length(tokenizer, model) if max_length is None else int(max_length)
    ids = _ids_of(tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length))
    plain = _ids_of(tokenizer(texts, add_special_tokens=False))
    for i, row in enumerate(plain):
        if not row:
            raise InputError(f"input {i} is empty ({texts[i]!r} has no tokens)")
    lengths = [len(row) for row in ids]
    if positions is None:

        if isinstance(model, ReftModelForSequenceClassification):
            pooling = model.pooling
        else:
            pooling = default_pooling(model.model if isinstance(model, ReftModel) else model)
        positions = "f1" if pooling == "first" else "l1"
    if isinstance(positions, str):
        locations = _spec_locations(positions, lengths, num_interventions, share_weights)
    else:
        zeros = [0] * len(lengths)
        locations = _explicit_locations(positions, lengths, num_interventions, zeros, zeros)
    for i, target in enumerate(targets):
        if hasattr(target, "tolist"):
            targets[i] = target.tolist()
    columns = {"input_ids": ids, "labels": targets, "intervention_locations": locations}
    return {"train_dataset": _dataset(columns), "eval_dataset": None, "data_collator": collator}
