"""Prompts in, text out: tokenizing prompts the way training does, and batched generation with interventions.

Interventions trained with position specs such as ``"l1"`` (the last prompt token) only act on
the right token at generation time when the prompt is tokenized exactly as it was during
training. These helpers guarantee that:

* :func:`encode_prompts` gives each prompt's token ids exactly as the training data modules
  (:mod:`reftlib.training.data`) build them: the tokenizer's *leading* special tokens (e.g. BOS,
  never a trailing SEP/EOS), then the text without special tokens, and no second BOS when the
  text already starts with one (e.g. from a chat template).
* :func:`tokenize_prompts` pads those ids on the *left* into a batch, so that every row's last
  prompt token sits at the end, where generation continues, and ``"l1"`` lands on it.
* :func:`generate_texts` generates answers in batches, optionally next to the base model's
  answers from the same call (rows without interventions), and decodes only the new tokens.

Format chat prompts first with :func:`reftlib.training.apply_chat_template` (the templated
strings go into these functions unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError

if TYPE_CHECKING:
    from .model import ReftModel

__all__ = ["encode_prompts", "generate_texts", "leading_special_ids", "tokenize_prompts"]


def _text_list(texts: Any, name: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise InputError(f"{name} must be a list of strings, got a single string; wrap it in a list: [{name}]")
    try:
        values = list(texts)
    except TypeError:
        raise InputError(f"{name} must be a list of strings, got {type(texts).__name__}") from None
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise InputError(f"{name}[{i}] is a {type(text).__name__}, not a string ({text!r})")
    return values


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts *before* a text (e.g. ``[bos]``; ``[]`` for GPT-2)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    if not plain:
        return []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids of each prompt as the training data modules build them (see the module docs).

    Returns ``(ids, n_prefix, body_lengths)``: per prompt, its ids (leading special tokens +
    text), how many leading special ids it starts with, and how many ids the text itself has
    (``0`` for a text that yields no tokens).
    """
    prompts = _text_list(prompts, "prompts")
    prefix = leading_special_ids(tokenizer)
    bodies = [list(row) for row in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    ids, n_prefix, body_lengths = [], [], []
    for body in bodies:
        if prefix and body[:len(prefix)] == prefix:  # already templated with BOS: keep a single one
            body = body[len(prefix):]
        ids.append(prefix + body)
        n_prefix.append(len(prefix))
        body_lengths.append(len(body))
    return ids, n_prefix, body_lengths


def tokenize_prompts(tokenizer: Any, texts: Sequence[str], device: torch.device | str | None = None
                     ) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[batch, width]`` for prompts, padded on the left.

    The ids are those of :func:`encode_prompts` (the training tokenization). Padding uses the
    tokenizer's pad id (``0`` when it has none: padded entries are masked, so the id never matters);
    the attention mask comes from each prompt's length, never from comparing ids with the pad id.
    ``device`` moves both tensors (default: the CPU).
    """
    texts = _text_list(texts, "texts")
    ids, _, _ = encode_prompts(tokenizer, texts)
    if not ids:
        raise InputError("texts is empty; pass at least one prompt")
    for i, row in enumerate(ids):
        if not row:
            raise InputError(f"prompt {i} ({texts[i]!r}) has no tokens; generation needs at least one prompt token")
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def generate_texts(reft_model: ReftModel, tokenizer: Any, texts: Sequence[str], *, max_new_tokens: int = 64,
                   mode: str = "auto", positions: str | None = None, compare: bool = False,
                   batch_size: int = 8, **generate_kwargs: Any) -> list[tuple[str | None, str]]:
    """``(base answer or None, answer with interventions)`` per prompt, generated ``batch_size`` at a time.

    ``texts`` are final prompt strings (already chat-templated if wanted); they are tokenized with
    :func:`tokenize_prompts` on the model's device. ``mode`` and ``positions`` (a spec overriding
    the positions saved with each intervention) are passed to :meth:`reftlib.ReftModel.generate`.
    Decoding is greedy unless ``do_sample=True`` is given; other keyword arguments go to
    ``generate``. Answers are the new tokens only, decoded without special tokens and stripped.

    With ``compare`` every batch holds each prompt twice, once without interventions
    (``adapter_names=None`` rows) and once with the active adapters (stacked in order, as a plain
    call applies them), so both answers come from one call; otherwise the first element is ``None``.
    """
    texts = _text_list(texts, "texts")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    results: list[tuple[str | None, str]] = []
    active = reft_model.active_adapters
    adapter: str | list[str] = active[0] if len(active) == 1 else list(active)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, **generate_kwargs}
    kwargs.setdefault("do_sample", False)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        rows = chunk * 2 if compare else chunk
        batch = tokenize_prompts(tokenizer, rows, reft_model.device)
        names = [None] * len(chunk) + [adapter] * len(chunk) if compare else None
        out = reft_model.generate(**batch, unit_locations=positions, mode=mode, adapter_names=names, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        decoded = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        if compare:
            results.extend(zip(decoded[:len(chunk)], decoded[len(chunk):]))
        else:
            results.extend((None, text) for text in decoded)
    return results
