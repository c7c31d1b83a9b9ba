"""Fold LoFiT interventions into the model's weights: a plain Hugging Face model, no hooks, no reftlib.

Both LoFiT interventions act on the input ``z`` of the attention output projection
``y = W z + b`` (``z`` viewed as ``[heads, head_dim]``) at every position, so they are affine maps
of ``z`` that fold exactly into ``W`` and ``b``:

* offset ``z_h ← z_h + v_h`` (:class:`~reftlib.HeadBiasIntervention`): ``b ← b + W[:, cols(h)] · v_h``;
* scale ``z_h ← (1 + A_h) ⊙ z_h`` (:class:`~reftlib.HeadScaleIntervention`): ``W · diag(1 + A)``,
  i.e. ``W[:, cols(h)] ← W[:, cols(h)] · diag(1 + A_h)`` (the *input* columns of head ``h``).

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

import torch
from torch import nn

from ..checks import require_reft_model, unwrap_model
from ..components import resolve_site
from ..errors import AdapterError, MergeError
from ..interventions import HeadBiasIntervention, HeadScaleIntervention, Intervention
from ..model import ReftModel

__all__ = ["MergeError", "merge_and_unload"]

logger = logging.getLogger(__name__)

_MERGEABLE = (HeadScaleIntervention, HeadBiasIntervention)
_BIAS_FLAGS = ("attention_bias", "bias", "use_bias", "add_bias_linear")


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W`` stored as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _plan(reft_model: ReftModel, names: Sequence[str]) -> dict[str, tuple[nn.Module, int, list[Intervention]]]:
    """``projection path -> (module, num_heads, interventions in application order)``; validates everything."""
    plan: dict[str, tuple[nn.Module, int, list[Intervention]]] = {}
    for name in names:
        for rep in reft_model.reft_configs[name].representations:
            iv = rep.intervention
            where = f"adapter {name!r}, intervention {rep.name!r} (layer {rep.layer}, {rep.component})"
            if type(iv) not in _MERGEABLE:
                raise MergeError(
                    f"{where} is a {type(iv).__name__}; only HeadScaleIntervention and HeadBiasIntervention "
                    "(affine edits of the attention heads) can be folded into the weights. Keep using the ReftModel"
                )
            if rep.positions is not None:
                raise MergeError(
                    f"{where} acts only at positions {rep.positions!r}; a merged weight acts at every position, "
                    "so only interventions configured with positions=None can be merged"
                )
            site = resolve_site(reft_model.model, rep.layer, rep.component)
            module = site.module
            if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                raise MergeError(
                    f"{where}: the output projection {site.path} is a {type(module).__name__}; merging supports "
                    "nn.Linear and transformers' Conv1D"
                )
            if iv.num_heads != site.num_heads:
                raise MergeError(f"{where}: built for {iv.num_heads} heads but {site.path} has {site.num_heads}")
            plan.setdefault(site.path, (module, site.num_heads, []))[2].append(iv)
    return plan


@torch.no_grad()
def _fold(module: nn.Module, interventions: Sequence[Intervention]) -> bool:
    """Fold ``interventions`` (in application order) into ``module``; return whether a bias was created."""
    weight = module.weight
    # M is the projection as [in, out] (a view): y = z @ M + b.
    matrix = weight if _is_conv1d(module) else weight.T
    out_features = matrix.shape[1]
    m = matrix.float().clone()
    had_bias = module.bias is not None
    b = module.bias.float().clone() if had_bias else torch.zeros(out_features, device=weight.device)
    for iv in reversed(interventions):  # the last edit applied is the first folded
        if isinstance(iv, HeadScaleIntervention):
            factor = (1.0 + iv.scale.detach().float()).reshape(-1).to(m.device)
            m *= factor.unsqueeze(1)
        else:
            offsets = torch.zeros(iv.num_heads, iv.head_dim, device=m.device)
            offsets[iv.head_index.to(m.device)] = iv.bias.detach().float().to(m.device)
            b += offsets.reshape(-1) @ m
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
    """Fold head scales/offsets into the attention output projections and return the plain base model.

    Args:
        reft_model: a :class:`~reftlib.ReftModel` whose interventions are all
            :class:`~reftlib.HeadScaleIntervention` / :class:`~reftlib.HeadBiasIntervention` at
            ``head_output`` with ``positions=None`` (every token), e.g. from
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
        MergeError: before changing anything, when an intervention is of another type or is
            restricted to some positions.
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
    plan = _plan(reft_model, names)
    created = [path for path, (module, _, interventions) in plan.items() if _fold(module, interventions)]
    model = reft_model.detach()
    if created:
        _make_loadable(model, created)
    return model
