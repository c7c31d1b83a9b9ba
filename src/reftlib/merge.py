"""Fold interventions into the model's weights: a plain Hugging Face model, no hooks, no reftlib.

An intervention is *foldable* (``Intervention.foldable``) when it acts at every position on the
input ``z`` of a linear projection ``y = W z + b`` as an affine map with constant coefficients;
it then folds exactly into ``W`` and ``b`` through its ``fold_into(weight, bias)``. LoFiT's two
interventions act on the input of the attention output projection (``z`` viewed as
``[heads, head_dim]``):

* offset ``z_h ← z_h + v_h`` (:class:`~reftlib.HeadBiasIntervention`): ``b ← b + W[:, cols(h)] · v_h``;
* scale ``z_h ← (1 + A_h) ⊙ z_h`` (:class:`~reftlib.HeadScaleIntervention`): ``W · diag(1 + A)``,
  i.e. ``W[:, cols(h)] ← W[:, cols(h)] · diag(1 + A_h)`` (the *input* columns of head ``h``).

Input-dependent edits (LoReFT and the other ReFT variants) cannot be folded: merging a model that
has any raises :class:`~reftlib.errors.MergeError` naming each of them, before anything changes.

Several interventions on one projection are folded in reverse order of application, so any
stack is merged exactly. ``nn.Linear`` stores ``W`` as ``[out, in]``; GPT-2's ``Conv1D`` as
``[in, out]`` (handled). A projection without a bias gets one; for the saved model to reload
with plain ``transformers``, the config flag that creates that bias (``attention_bias`` on
Llama/Gemma/Mistral/Qwen3-style models) is switched on and the other projections it adds a bias
to receive zero biases, which changes nothing numerically.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checks import require_reft_model, unwrap_model
from .components import resolve_site
from .errors import AdapterError, MergeError
from .interventions import Intervention

if TYPE_CHECKING:
    from .model import ReftModel

__all__ = ["MergeError", "merge_and_unload"]

logger = logging.getLogger(__name__)

_BIAS_FLAGS = ("attention_bias", "bias", "use_bias", "add_bias_linear")


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W`` stored as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _plan(reft_model: ReftModel, names: Sequence[str]) -> dict[str, tuple[nn.Module, list[Intervention]]]:
    """``projection path -> (module, interventions in application order)``; every problem is reported at once."""
    plan: dict[str, tuple[nn.Module, list[Intervention]]] = {}
    problems: list[str] = []
    for name in names:
        for rep in reft_model.reft_configs[name].representations:
            iv = reft_model.adapters[name][rep.name]
            where = f"adapter {name!r}, intervention {rep.name!r} ({type(iv).__name__} at layer {rep.layer}, {rep.component})"
            if not iv.foldable:
                problems.append(f"{where}: its edit depends on the hidden state, so no weight change reproduces it "
                                "(of the built-in types, only HeadScaleIntervention and HeadBiasIntervention fold)")
                continue
            if rep.positions is not None:
                problems.append(f"{where}: acts only at positions {rep.positions!r}, but a merged weight acts at "
                                "every position (only interventions configured with positions=None merge)")
                continue
            site = resolve_site(reft_model.model, rep.layer, rep.component)
            module = site.module
            if site.kind != "input" or not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                problems.append(f"{where}: the site is not the input of a linear projection ({site.path}, "
                                f"{site.kind} of a {type(module).__name__}); merging folds into such a projection")
                continue
            if site.num_heads and getattr(iv, "num_heads", site.num_heads) != site.num_heads:
                problems.append(f"{where}: built for {iv.num_heads} heads but {site.path} has {site.num_heads}")
                continue
            plan.setdefault(site.path, (module, []))[1].append(iv)
    if problems:
        raise MergeError(
            "cannot merge these interventions into the weights (nothing was changed); keep using the ReftModel, "
            "or merge only the foldable adapters with adapter_names=[...]:\n  - " + "\n  - ".join(problems)
        )
    return plan


@torch.no_grad()
def _fold(module: nn.Module, interventions: Sequence[Intervention]) -> bool:
    """Fold ``interventions`` (in application order) into ``module``; return whether a bias was created."""
    weight = module.weight
    # M is the projection as [in, out] (a view): y = z @ M + b.
    matrix = weight if _is_conv1d(module) else weight.T
    out_features = matrix.shape[1]
    compute = torch.promote_types(weight.dtype, torch.float32)  # fp32 at least, fp64 for a float64 model
    m = matrix.to(compute).clone()
    had_bias = module.bias is not None
    b = module.bias.to(compute).clone() if had_bias else torch.zeros(out_features, device=weight.device, dtype=compute)
    for iv in reversed(interventions):  # the last edit applied is the first folded
        iv.fold_into(m, b)
    matrix.copy_(m.to(matrix.dtype))
    if had_bias:
        module.bias.copy_(b.to(module.bias.dtype))
        return False
    module.bias = nn.Parameter(b.to(weight.dtype), requires_grad=weight.requires_grad)
    return True


def _make_loadable(model: nn.Module, new_bias_paths: Sequence[str]) -> bool:
    """Switch on the config flag that gives the projections at ``new_bias_paths`` a bias, if there is one.

    The candidate config is checked by building the model on the meta device: it must have exactly
    the current parameters plus biases of linear layers that have none (those get zeros).
    """
    config = model.config
    current = dict(model.named_parameters())
    for flag in _BIAS_FLAGS:
        if getattr(config, flag, None) is not False:
            continue
        candidate = copy.deepcopy(config)
        setattr(candidate, flag, True)
        try:
            with torch.device("meta"):
                skeleton = type(model)(candidate)
        except Exception:  # this flag does not build: try the next one
            continue
        wanted = {name: p.shape for name, p in skeleton.named_parameters()}
        extra = set(wanted) - set(current)
        if set(current) - set(wanted) or not all(f"{p}.bias" in wanted for p in new_bias_paths):
            continue
        modules = {n: model.get_submodule(n.removesuffix(".bias")) for n in extra}
        if not all(n.endswith(".bias") and isinstance(m, nn.Linear) and m.bias is None for n, m in modules.items()):
            continue
        for name, module in modules.items():
            module.bias = nn.Parameter(module.weight.new_zeros(wanted[name]), requires_grad=module.weight.requires_grad)
        setattr(config, flag, True)
        return True
    logger.warning(
        "merged LoFiT offsets into new biases of %s, but no config flag of %s creates these biases: the merged "
        "model works in memory, but save_pretrained() + from_pretrained() with plain transformers would drop them",
        ", ".join(new_bias_paths[:3]) + (" ..." if len(new_bias_paths) > 3 else ""), type(model).__name__,
    )
    return False


def merge_and_unload(reft_model: ReftModel, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold every intervention into the projection that reads its site and return the plain base model.

    Args:
        reft_model: a :class:`~reftlib.ReftModel` whose interventions are all foldable
            (``Intervention.foldable``: :class:`~reftlib.HeadScaleIntervention` and
            :class:`~reftlib.HeadBiasIntervention` among the built-ins) at the input of a linear
            projection (``head_output``) with ``positions=None`` (every token), e.g. from
            :func:`~reftlib.lofit.tune_offsets`.
        adapter_names: the adapters to merge, in their stacking order (default: the active ones; one
            name may be given as a string).
            Other adapters are dropped with the ReftModel.

    Returns:
        the base model (modified in place) with every reftlib hook removed: it needs no reftlib at
        inference, ``generate`` works as usual, and ``save_pretrained`` output reloads with plain
        ``transformers`` (see the module documentation for models whose projection had no bias).
        Outputs equal the ReftModel's in eval mode (intervention dropout is not merged).

    Raises:
        MergeError: before changing anything, naming every intervention that cannot be folded
            (input-dependent like LoReFT, restricted to some positions, or not at a linear's input).
    """
    reft_model = unwrap_model(require_reft_model(reft_model, "reft_model", "merge_and_unload"))
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    names = list(reft_model.active_adapters if adapter_names is None else adapter_names)
    if not names:
        raise MergeError("no adapter to merge: none is active; pass adapter_names=[...]")
    for name in names:
        if not isinstance(name, str) or name not in reft_model.adapters:
            raise AdapterError(f"unknown adapter {name!r}; this model has adapters {reft_model.adapter_names}")
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter_names {names} names an adapter twice; each adapter is folded once")
    plan = _plan(reft_model, names)
    created = [path for path, (module, interventions) in plan.items() if _fold(module, interventions)]
    model = reft_model.detach()
    if created:
        _make_loadable(model, created)
    return model
