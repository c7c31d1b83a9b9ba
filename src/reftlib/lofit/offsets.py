"""LoFiT step 2: learn offsets on the selected heads, ``z_h ← z_h + v_h`` at every position.

Starting from the clean model, each layer with selected heads gets one
:class:`~reftlib.HeadBiasIntervention` at ``head_output`` holding a ``[k_layer, head_dim]`` offset
(initialised near zero), applied at every token. Only these offsets are trained (no L1 term).
The result is an ordinary :class:`~reftlib.ReftModel`: ``save_pretrained`` stores the head lists in
the intervention configs, ``ReftModel.from_pretrained`` loads them back, and
:func:`~reftlib.lofit.merge_and_unload` folds the offsets into the attention output projections.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainingArguments, set_seed

from ..checks import require_model, require_tokenizer
from ..model import DEFAULT_ADAPTER, ReftModel, get_reft_model
from ._fit import fit
from .selection import HeadSelection, lofit_config

__all__ = ["tune_offsets"]


def tune_offsets(
    model: nn.Module,
    heads: HeadSelection | Mapping[int, Iterable[int]] | Iterable[Sequence[int]],
    train_data: Any,
    *,
    tokenizer: Any,
    lr: float = 1e-2,
    epochs: float = 5,
    batch_size: int = 8,
    objective: str | None = None,
    beta: float = 0.1,
    init_std: float = 1e-3,
    seed: int = 42,
    max_length: int | None = None,
    training_args: Mapping[str, Any] | TrainingArguments | None = None,
    eval_data: Any = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> ReftModel:
    """LoFiT step 2: attach offsets to ``heads`` and train them on ``train_data``; return the ReftModel.

    Args:
        model: the clean base model (as left by :func:`~reftlib.lofit.select_heads`).
        heads: a :class:`~reftlib.lofit.HeadSelection`, a list of ``(layer, head)`` pairs or a dict
            ``layer -> heads``.
        train_data: ``(prompt, answer)`` pairs (cross-entropy) or ``(prompt, chosen, rejected)``
            triples (DPO); ``objective`` overrides the choice (see :mod:`reftlib.lofit.data`).
        tokenizer: the model's tokenizer (needs a pad token).
        lr, epochs, batch_size: optimizer settings (LoFiT: lr 8e-3…2e-2, 5 epochs, batch 8).
        beta: DPO temperature. init_std: std of the initial offsets. seed: for init and data order.
        max_length: longest example in tokens. training_args: extra ``TrainingArguments`` fields or a
            complete ``TrainingArguments`` (pass ``output_dir`` there to keep checkpoints).
        eval_data: optional data of the same form, for ``eval_strategy`` in ``training_args``.
        adapter_name: name of the adapter holding the offsets.

    Returns:
        the trained :class:`~reftlib.ReftModel` in eval mode. Its interventions act on every token:
        ``reft_model(**inputs)``, scoring and ``reft_model.generate(...)`` (prompt and generated
        tokens) use them everywhere; :func:`~reftlib.lofit.merge_and_unload` folds them into the model.
    """
    require_model(model, "model", "tune_offsets")
    require_tokenizer(tokenizer, "tokenizer", "tune_offsets")
    set_seed(seed)
    reft_model = get_reft_model(model, lofit_config(heads, init_std=init_std), adapter_name=adapter_name)
    fit(reft_model, tokenizer, train_data, objective=objective, lr=lr, epochs=epochs, batch_size=batch_size,
        seed=seed, beta=beta, max_length=max_length, training_args=training_args, eval_data=eval_data)
    return reft_model
