"""Sharded training of interventions with FSDP2 (``torch.distributed.fsdp.fully_shard``).

ReFT trains a few kilobytes on a frozen model, but DDP keeps a whole copy of the base model on
every process. FSDP2 shards the frozen base instead: each of ``N`` processes holds ``1/N`` of
every decoder layer's weights (and of the embeddings and head) and all-gathers one layer at a
time for its forward and backward. The recipe, applied by :func:`shard_reft_model`:

1. freeze the base model (``get_reft_model`` does) and build the :class:`~reftlib.ReftModel`;
2. ``fully_shard`` each decoder layer (found with :func:`reftlib.components.find_layers`), then
   the ``ReftModel`` itself. The interventions are submodules of the root
   (``reft_model.adapters``), so the root's FSDP unit owns them: they are all-gathered whole
   for every forward (the hooks see ordinary tensors) and their gradients are reduce-scattered
   (averaged over processes) like any sharded parameter;
3. build the optimizer *after* sharding, over the parameters that require gradients (the
   interventions only);
4. save with :func:`gather_reft_state_dict` + ``save_pretrained(dir, state_dict=...,
   is_main_process=rank == 0)`` (every process must call the gather: it is a collective), and
   resume with :func:`load_sharded_intervention_weights` plus torch's
   ``get_optimizer_state_dict``/``set_optimizer_state_dict`` for the optimizer.

The saved folder is an ordinary reftlib folder: ``ReftModel.from_pretrained(folder, model)``
loads it in a single process. See ``docs/distributed.md`` for DDP vs FSDP2 vs ZeRO-3, memory
arithmetic and what was and was not run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from .adapter_state import split_extra, state_dict_key, state_dict_mismatch
from .checks import require_reft_model
from .components import find_layers
from .config import DEFAULT_ADAPTER
from .errors import CheckpointError, ReftConfigError
from .interventions.rotation import OrthonormalRows
from .interventions.steps import tracked_modules
from .io import INDEX_NAME, WEIGHTS_NAME, read_adapter, saved_adapters
from .model import ReftModel

__all__ = [
    "after_deepspeed_step",
    "check_trainer_fsdp",
    "fsdp_layer_classes",
    "gather_reft_state_dict",
    "is_sharded",
    "load_sharded_intervention_weights",
    "shard_reft_model",
]

_BASE_PREFIX = "model."  # reft_model.state_dict() keys of the base model; everything else is reftlib's


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or to one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def fsdp_layer_classes(reft_model: ReftModel) -> list[str]:
    """Class names of the base model's decoder layers, the units FSDP should wrap.

    This is what ``fsdp_config={"transformer_layer_cls_to_wrap": [...]}`` of a ``TrainingArguments``
    takes (it otherwise defaults to the model's ``_no_split_modules``).
    """
    require_reft_model(reft_model, "reft_model", "fsdp_layer_classes", cls=ReftModel)
    _path, layers = find_layers(reft_model.model)
    return sorted({type(layer).__name__ for layer in layers})


def _check_shardable(reft_model: Any, where: str) -> None:
    require_reft_model(reft_model, "reft_model", where, cls=ReftModel)
    if not isinstance(reft_model, ReftModel):
        raise ReftConfigError(
            f"{where}: pass the ReftModel itself, not a {type(reft_model).__name__} wrapping it "
            "(shard before wrapping; FSDP2 does the gradient reduction that DDP would)"
        )
    trainable = [name for name, param in reft_model.model.named_parameters() if param.requires_grad]
    if trainable:
        shown = ", ".join(trainable[:3]) + (f" and {len(trainable) - 3} more" if len(trainable) > 3 else "")
        raise ReftConfigError(
            f"{where}: {len(trainable)} base-model parameter(s) are trainable ({shown}); sharding is for a frozen "
            "base with trainable interventions. Freeze the base (reft_model.model.requires_grad_(False), as "
            "get_reft_model does by default), or train base weights (e.g. LoRA) with DDP"
        )
    if is_sharded(reft_model):
        raise ReftConfigError(f"{where}: this ReftModel is already sharded (fully_shard was applied); shard it once")


def shard_reft_model(reft_model: ReftModel, mesh: Any = None, **fully_shard_kwargs: Any) -> ReftModel:
    """Shard a :class:`~reftlib.ReftModel`'s frozen base with FSDP2; the interventions train replicated in effect.

    Applies ``torch.distributed.fsdp.fully_shard`` to each decoder layer of the base model, then
    to ``reft_model`` (the root unit: embeddings, final norm, head and the interventions), and
    registers ``generate`` as an FSDP forward method so that it all-gathers the root's
    parameters as ``forward`` does. Call it on every process after
    ``torch.distributed.init_process_group`` and before building the optimizer.

    Args:
        reft_model: the model to shard, in place (its class becomes an ``FSDPModule`` subclass).
        mesh: a 1-D ``DeviceMesh`` over the processes (default: all of them, on the model's
            device type). A 2-D mesh gives HSDP, as ``fully_shard`` documents.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``, ...).

    Returns:
        ``reft_model`` itself.

    Raises:
        ReftConfigError: ``reft_model`` is not a ReftModel (or is wrapped), a base-model parameter
            requires gradients, the model is already sharded, or torch.distributed is not initialized.
    """
    _check_shardable(reft_model, "shard_reft_model")
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh is None and not (dist.is_available() and dist.is_initialized()):
        raise ReftConfigError(
            "shard_reft_model: torch.distributed is not initialized; launch with torchrun and call "
            "torch.distributed.init_process_group() first (or pass mesh=)"
        )
    _path, layers = find_layers(reft_model.model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    fully_shard(reft_model, mesh=mesh, **fully_shard_kwargs)
    register_fsdp_forward_method(reft_model, "generate")
    return reft_model


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state (a no-grad forward leaves the root unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_reft_state_dict(reft_model: ReftModel) -> dict[str, torch.Tensor]:
    """The full tensors of every non-base entry of ``reft_model.state_dict()`` (``adapters.*``), on the CPU.

    A collective: call it on every process. Only the interventions (and any other reftlib module,
    e.g. a classification head) are gathered, a few kilobytes, never the base weights: torch's
    ``get_model_state_dict(reft_model, options=StateDictOptions(full_state_dict=True))`` gives the
    same entries but also gathers the whole base model. Pass the result to
    ``reft_model.save_pretrained(dir, state_dict=..., is_main_process=rank == 0)``. An unsharded
    model returns its own tensors (copied to the CPU). Under DeepSpeed ZeRO-3 pass ``engine.module``:
    the interventions' partitioned parameters are gathered the same way.
    """
    require_reft_model(reft_model, "reft_model", "gather_reft_state_dict", cls=ReftModel)
    from torch.distributed.tensor import DTensor

    _reshard(reft_model)
    # DeepSpeed ZeRO-3 partitions parameters in place (an empty tensor and a ``ds_id``): gather ours.
    partitioned = [p for name, p in reft_model.named_parameters()
                   if not name.startswith(_BASE_PREFIX) and hasattr(p, "ds_id")]
    gathering = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gathering = deepspeed.zero.GatheredParameters(partitioned)
    gathered = {}
    with gathering:
        for name, tensor in reft_model.state_dict().items():
            if name.startswith(_BASE_PREFIX):
                continue
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            gathered[name] = tensor.detach().cpu().clone()
    return gathered


def load_sharded_intervention_weights(reft_model: ReftModel, folder: str | os.PathLike) -> None:
    """Copy the interventions saved in ``folder`` into a sharded ``reft_model`` (resuming under FSDP2).

    The counterpart of :func:`reftlib.training.load_intervention_weights` for a model that
    :func:`shard_reft_model` has sharded: every process reads the (small) files and each keeps its
    own shard, through ``torch.distributed.checkpoint.state_dict.set_model_state_dict`` with a
    full state dict. A collective: call it on every process. Parameter objects are kept, so an
    optimizer built before still points at them; cached values (LoReFT's rotation) are dropped.

    Raises:
        CheckpointError: the folder holds no saved interventions, an adapter the model lacks,
            tensors that do not fit, or extra state (a classification head), which is not
            supported under FSDP2.
    """
    require_reft_model(reft_model, "reft_model", "load_sharded_intervention_weights", cls=ReftModel)
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    root = Path(folder)
    if not ((root / WEIGHTS_NAME).is_file() or (root / INDEX_NAME).is_file()):
        raise CheckpointError(f"{root} holds no {WEIGHTS_NAME}; pass a folder written by save_pretrained")
    default = DEFAULT_ADAPTER if DEFAULT_ADAPTER in reft_model.adapters else reft_model.adapter_names[0]
    adapters, _active = saved_adapters(root, default_name=default)
    full: dict[str, torch.Tensor] = {}
    for name, sub in adapters.items():
        if name not in reft_model.adapters:
            raise CheckpointError(f"{root} has an adapter {name!r} that this model lacks ({reft_model.adapter_names})")
        _config, tensors = read_adapter(root / sub)
        tensors, extra = split_extra(tensors)
        if extra:
            raise CheckpointError(
                f"{root / sub} holds extra state ({sorted(extra)}) besides interventions; loading it into a "
                "sharded model is not supported: load it unsharded with ReftModel.from_pretrained"
            )
        prefix = state_dict_key(name)
        expected = {k[len(prefix):]: v for k, v in reft_model.state_dict().items() if k.startswith(prefix)}
        problem = state_dict_mismatch(expected, tensors)
        if problem:
            raise CheckpointError(f"{root / sub}: adapter {name!r} does not fit this model ({problem})")
        full.update({prefix + k: v for k, v in tensors.items()})
    _reshard(reft_model)
    set_model_state_dict(reft_model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    for module in reft_model.modules():  # the values cached from the old parameters are stale
        if isinstance(module, OrthonormalRows):
            module.clear_cache()


def after_deepspeed_step(reft_model: nn.Module) -> None:
    """Run the interventions' post-step updates (LoReFT's rotation retraction) after a DeepSpeed ZeRO step.

    With ZeRO (stages 1-3) the optimizer that steps holds DeepSpeed's flat fp32 partitions, not the
    model's parameters, so the post-step hook of :mod:`reftlib.interventions.steps` cannot see
    which interventions were updated. Call this after every ``engine.step()`` that stepped (the
    reftlib trainers do it themselves); every process must call it. For each intervention with a
    post-step update: its parameters are gathered (ZeRO-3 partitions them), updated the same way
    on every process, and written both to the model's parameters and to the optimizer's fp32
    master copy (otherwise the next step would start from the old values).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    order = {id(param): index for index, param in enumerate(reft_model.parameters())}
    work = []
    for module in tracked_modules(reft_model):
        params = [p for p in module.parameters() if p.requires_grad and id(p) in order]
        if params:  # as the optimizer hook does: an intervention's inner rotation before the intervention
            work.append(((min(order[id(p)] for p in params), len(params)), module, params))
    for _order, module, params in sorted(work, key=lambda item: item[0]):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            with torch.no_grad():  # start from the optimizer's fp32 values, which the step just wrote
                for param in params:
                    master = safe_get_full_fp32_param(param)
                    if master is not None:
                        param.copy_(master.view_as(param).to(param.dtype))
            module.after_optimizer_step()
            updated = [param.detach().clone() for param in params]
        for param, value in zip(params, updated):
            safe_set_full_fp32_param(param, value.float())


def check_trainer_fsdp(fsdp_plugin: Any) -> None:
    """Refuse the FSDP setups reftlib's trainers cannot train (called by ``ReftTrainer.__init__``).

    FSDP2 (``fsdp_config={"version": 2}``) is accepted. FSDP1 is refused: it flattens each
    unit's parameters into one tensor, so a unit holding frozen base weights and trainable
    interventions needs ``use_orig_params`` and still handles them badly.

    Checkpoints need ``state_dict_type`` ``FULL_STATE_DICT``: with accelerate's default for FSDP2,
    ``SHARDED_STATE_DICT``, the Trainer never calls the save that writes reftlib's folder, so the
    checkpoints would hold no interventions and could not be resumed.

    Raises:
        ReftConfigError: FSDP1, or a state dict type other than ``FULL_STATE_DICT``.
    """
    version = getattr(fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ReftConfigError(
            f"reftlib trainers support FSDP2 only, got FSDP version {version}: set "
            "TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2}) (FSDP1 handles frozen base weights "
            "and trainable interventions in one unit badly), or use DDP (torchrun without fsdp)"
        )
    kind = getattr(fsdp_plugin, "state_dict_type", None)
    name = getattr(kind, "name", kind)
    if name is not None and str(name).rsplit(".", 1)[-1].upper() != "FULL_STATE_DICT":
        raise ReftConfigError(
            f"FSDP state_dict_type is {name}, but reftlib's checkpoints are written from the full state dict: set "
            "fsdp_config={'version': 2, 'state_dict_type': 'FULL_STATE_DICT'} (accelerate config: "
            "fsdp_state_dict_type: FULL_STATE_DICT); only the intervention weights are written"
        )
