"""Small helpers shared by the tests."""

from __future__ import annotations

import torch

import reftlib


def randomize(reft_model: reftlib.ReftModel, scale: float = 0.5, seed: int = 1) -> None:
    """Give every intervention parameter a clearly non-trivial value (fresh ones are near identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reft_model.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)


def capture_site(model, site, kind=None):
    """Register a hook (after reftlib's) that records the site tensor; returns (store, handle)."""
    store = {}
    kind = kind or site.kind
    if kind == "input":
        def pre(module, args, kwargs):
            store["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handle = site.module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module, args, output):
            out = output if isinstance(output, torch.Tensor) else output[0]
            store["x"] = out.detach().clone()
        handle = site.module.register_forward_hook(post)
    return store, handle


def make_intervention(component: str, rank: int = 2):
    if component == "head_output":
        return reftlib.HeadBiasIntervention(heads=[0, 2])
    return reftlib.LoreftIntervention(low_rank_dimension=rank)
