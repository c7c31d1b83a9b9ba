"""ReFT together with a PEFT adapter (LoRA, DoRA, ...): one folder for both, reloaded in one call.

reftlib attaches to a ``peft.PeftModel`` like to any Hugging Face model, so interventions and a
LoRA can be trained together::

    peft_model = peft.get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    reft_model = reftlib.get_reft_model(peft_model, reft_config, disable_model_grads=False)
    ...  # train: the LoRA weights and the interventions both require grad
    save_reft_and_lora(reft_model, "out")            # out/lora (PEFT files) + out/reft (reftlib files)
    reft_model = load_reft_and_lora(fresh_model, "out")

``disable_model_grads=False`` matters: the default freezes every base-model parameter, LoRA's
included. Saving writes the two formats side by side, each loadable on its own with its own
library (``PeftModel.from_pretrained(model, "out/lora")``, ``ReftModel.from_pretrained("out/reft", m)``).

Order of attachment: interventions on ``block_*``, ``attention_*``/``mlp_*`` and ``head_output``
(when LoRA does not wrap the output projection) see the same tensors whichever was attached
first. Interventions on a projection that LoRA wraps (``query_output`` with LoRA on ``q_proj``, or
a module path to such a projection) must be attached *after* LoRA: attached before, their hook
stays on the wrapped ``base_layer`` and sees the projection's output without the LoRA term.
Loading with :func:`load_reft_and_lora` always attaches LoRA first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .checks import require_model, require_reft_model, unwrap_model
from .errors import CheckpointError, ReftConfigError
from .io import WEIGHTS_NAME
from .model import ReftModel

__all__ = ["LORA_SUBFOLDER", "REFT_SUBFOLDER", "find_peft_model", "load_reft_and_lora", "save_reft_and_lora"]

LORA_SUBFOLDER = "lora"
REFT_SUBFOLDER = "reft"


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ReftConfigError("this needs the peft package: pip install 'reftlib[peft]'") from exc
    return peft


def find_peft_model(reft_model: ReftModel) -> nn.Module | None:
    """The ``peft.PeftModel`` that ``reft_model`` is attached to, or ``None``.

    Only a ReftModel built on a ``PeftModel`` knows it; when LoRA was applied to
    ``reft_model.model`` afterwards, keep the returned ``PeftModel`` and pass it explicitly.
    """
    require_reft_model(reft_model, "reft_model", "find_peft_model")
    peft = _peft()
    model = unwrap_model(reft_model).model
    return model if isinstance(model, peft.PeftModel) else None


def save_reft_and_lora(
    reft_model: ReftModel,
    save_directory: str | os.PathLike,
    *,
    peft_model: nn.Module | None = None,
    **peft_save_kwargs: Any,
) -> Path:
    """Save the PEFT adapter to ``save_directory/lora`` and the interventions to ``save_directory/reft``.

    Args:
        reft_model: the model whose interventions are saved (every adapter, as ``save_pretrained``).
        save_directory: the folder to write (created if needed).
        peft_model: the ``PeftModel`` holding the LoRA weights; by default ``reft_model.model``
            when that is a ``PeftModel``. Give it when LoRA was applied to ``reft_model.model``
            after the interventions (``peft.get_peft_model(reft_model.model, ...)``).
        **peft_save_kwargs: forwarded to ``peft_model.save_pretrained`` (e.g. ``selected_adapters``).

    Returns:
        ``save_directory`` as a :class:`~pathlib.Path`.
    """
    reft_model = unwrap_model(require_reft_model(reft_model, "reft_model", "save_reft_and_lora"))
    peft = _peft()
    if peft_model is None:
        peft_model = find_peft_model(reft_model)
        if peft_model is None:
            raise ReftConfigError(
                "this ReftModel is not attached to a peft.PeftModel; pass peft_model= (the PeftModel returned by "
                "peft.get_peft_model) or save the interventions alone with reft_model.save_pretrained()"
            )
    if not isinstance(peft_model, peft.PeftModel):
        raise ReftConfigError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    if peft_model is not reft_model.model and peft_model.get_base_model() is not reft_model.model:
        raise ReftConfigError(
            "peft_model does not wrap this ReftModel's base model; pass the PeftModel created on reft_model.model"
        )
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder; choose another save path")
    peft_model.save_pretrained(str(root / LORA_SUBFOLDER), **peft_save_kwargs)
    reft_model.save_pretrained(root / REFT_SUBFOLDER)
    return root


def load_reft_and_lora(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    *,
    is_trainable: bool = False,
    peft_kwargs: dict[str, Any] | None = None,
    **hub_kwargs: Any,
) -> ReftModel:
    """Load a folder written by :func:`save_reft_and_lora` onto a fresh base ``model``.

    LoRA is attached first (``peft.PeftModel.from_pretrained``), then the interventions on the
    resulting ``PeftModel`` (so ``reft_model.model`` is the ``PeftModel``).

    Args:
        model: the base model (not yet wrapped by PEFT or reftlib). PEFT edits it in place.
        path_or_repo_id: a local folder, or a Hub repo holding ``lora/`` and ``reft/`` (locally the
            interventions may also sit at the root, next to ``lora/``).
        is_trainable: keep the LoRA weights and the interventions trainable (to resume training);
            the other base-model weights stay frozen.
        peft_kwargs: extra arguments for ``PeftModel.from_pretrained`` (e.g. ``adapter_name``).
        **hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only`` for Hub repos.

    Returns:
        The :class:`~reftlib.ReftModel` (in eval mode unless ``is_trainable``).
    """
    peft = _peft()

    if isinstance(model, (peft.PeftModel, ReftModel)):
        raise ReftConfigError(
            f"load_reft_and_lora needs the plain base model, got a {type(model).__name__}; it attaches both adapters"
        )
    require_model(model, "model", "load_reft_and_lora")
    local = Path(path_or_repo_id)
    if local.is_dir():
        if not (local / LORA_SUBFOLDER).is_dir():
            raise CheckpointError(f"{local} has no {LORA_SUBFOLDER}/ folder; was it written by save_reft_and_lora()?")
        reft_folder = local / REFT_SUBFOLDER
        if not reft_folder.is_dir():
            if not (local / WEIGHTS_NAME).exists():
                raise CheckpointError(
                    f"{local} has no {REFT_SUBFOLDER}/ folder (nor {WEIGHTS_NAME}); was it written by save_reft_and_lora()?"
                )
            reft_folder = local  # interventions at the root, LoRA in lora/
        lora_source, lora_kwargs = str(local / LORA_SUBFOLDER), {}
        reft_source, reft_kwargs = reft_folder, {}
    else:
        repo = str(path_or_repo_id)
        lora_source, lora_kwargs = repo, {"subfolder": LORA_SUBFOLDER, **hub_kwargs}
        reft_source, reft_kwargs = repo, {"subfolder": REFT_SUBFOLDER, **hub_kwargs}
    peft_model = peft.PeftModel.from_pretrained(
        model, lora_source, is_trainable=is_trainable, **lora_kwargs, **(peft_kwargs or {})
    )
    lora_trainable = [p for p in peft_model.parameters() if p.requires_grad]
    reft_model = ReftModel.from_pretrained(reft_source, peft_model, is_trainable=is_trainable, **reft_kwargs)
    if is_trainable:  # ReftModel.from_pretrained freezes the whole base model, LoRA included
        for param in lora_trainable:
            param.requires_grad_(True)
    return reft_model
