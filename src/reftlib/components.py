"""Finding intervention sites on any Hugging Face model.

A *site* is a module plus which of its tensors is intervened on (its first input or its
output). Sites are discovered from structure, not looked up in a per-class table:

* the layer list is the ``nn.ModuleList`` whose length is the config's number of layers;
* inside a layer, the attention module is the child named like ``self_attn``/``attn``/
  ``attention``/``self_attention`` (or whose class name contains "Attention"), the MLP the child
  named ``mlp``/``feed_forward``/``ffn``... (or whose class contains "MLP"/"MoE");
* inside the attention module, the output projection is the linear layer named
  ``o_proj``/``out_proj``/``dense``/``c_proj``/``wo``, and the query/key/value projections are
  ``q_proj``/``query``/``q`` etc.

:data:`COMPONENT_OVERRIDES` is the one small table for architectures whose sub-blocks are
not separate modules (OPT's MLP is two bare linears; BERT's attention block already adds the
residual and normalizes). :func:`register_component_override` extends it.

Component meanings (``h`` is the residual stream):

==================  ===========================================================================
block_input         input of layer *i* (the residual stream before the layer)
block_output        output of layer *i* (the residual stream after the layer)
attention_input     input of the attention module (after the pre-attention norm, if any)
attention_output    output of the attention module: its contribution *before* it joins the
                    residual stream. On Gemma-2/3 and OLMo-2 this is before their
                    post-attention norm; on BERT/RoBERTa it is the output of the attention
                    output dense layer, before dropout, residual add and LayerNorm.
mlp_input           input of the MLP (after the pre-MLP norm, if any)
mlp_output          output of the MLP before it joins the residual stream (before Gemma-2/3's
                    and OLMo-2's post-feedforward norm; BERT: output dense, before residual+LN)
head_output         input of the attention output projection viewed as ``[B, T, heads, head_dim]``
                    (per-head attention outputs; correct for grouped-query attention and
                    ``head_dim × heads ≠ hidden_size``)
query/key/value_output   output of the separate q/k/v projections (flat ``[B, T, heads·head_dim]``),
                    only on models with separate projections
==================  ===========================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import ArchitectureError, ReftConfigError

HookKind = Literal["input", "output"]

#: Named components, resolved on any architecture by discovering its structure (see the table above).
COMPONENTS = (
    "block_input",
    "block_output",
    "attention_input",
    "attention_output",
    "mlp_input",
    "mlp_output",
    "head_output",
    "query_output",
    "key_output",
    "value_output",
)

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "ff")
_OUTPUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out")
_QKV_NAMES = {
    "query_output": ("q_proj", "query", "q", "wq"),
    "key_output": ("k_proj", "key", "k", "wk"),
    "value_output": ("v_proj", "value", "v", "wv"),
}

#: model_type -> component -> (module path relative to the layer, hook kind).
COMPONENT_OVERRIDES: dict[str, dict[str, tuple[str, HookKind]]] = {
    "opt": {"mlp_input": ("fc1", "input"), "mlp_output": ("fc2", "output")},
    "bert": {
        "attention_output": ("attention.output.dense", "output"),
        "mlp_input": ("intermediate", "input"),
        "mlp_output": ("output.dense", "output"),
    },
    "roberta": {
        "attention_output": ("attention.output.dense", "output"),
        "mlp_input": ("intermediate", "input"),
        "mlp_output": ("output.dense", "output"),
    },
}


def is_module_path(component: str) -> bool:
    """Module paths (``"model.layers.3.mlp"``, optionally ``":input"``) contain a dot or colon."""
    return "." in component or ":" in component


def register_component_override(model_type: str, component: str, path: str, kind: HookKind) -> None:
    """Teach reftlib where ``component`` lives on ``model_type`` (path relative to one layer)."""
    if component not in COMPONENTS:
        raise ReftConfigError(f"unknown component {component!r}; use one of {list(COMPONENTS)}")
    if kind not in ("input", "output"):
        raise ReftConfigError(f"kind must be 'input' or 'output', got {kind!r}")
    COMPONENT_OVERRIDES.setdefault(model_type, {})[component] = (path, kind)


@dataclass(frozen=True)
class Site:
    """A resolved intervention site."""

    module: nn.Module
    path: str  # full module path inside the model
    kind: HookKind  # intervene on the module's first input or on its output
    component: str
    layer: int | None
    num_heads: int | None = None  # set for head_output: the tensor is viewed as [B, T, heads, head_dim]

    @property
    def key(self) -> tuple[str, str]:
        return (self.path, self.kind)


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ArchitectureError(f"{type(model).__name__} has no .config; reftlib needs a Hugging Face PreTrainedModel")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _num_layers(model: nn.Module) -> int | None:
    config = text_config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer layers and its path (e.g. ``"model.layers"``)."""
    expected = _num_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    # Prefer lists of blocks that contain an attention module (not e.g. MoE expert lists).
    with_attention = [c for c in candidates if _find_child(c[1][0], _ATTENTION_NAMES, r"attention|attn") is not None]
    chosen = (with_attention or candidates)[:1]
    if not chosen:
        raise ArchitectureError(
            f"could not find the list of transformer layers in {type(model).__name__} (looked for an nn.ModuleList "
            f"of length {expected}); pass a module path as component instead, e.g. component='model.layers.3'"
        )
    return chosen[0]


def _find_child(layer: nn.Module, names: tuple[str, ...], class_pattern: str) -> tuple[str, nn.Module] | None:
    children = dict(layer.named_children())
    for name in names:
        if name in children:
            return name, children[name]
    pattern = re.compile(class_pattern, re.IGNORECASE)
    for name, child in children.items():
        if pattern.search(type(child).__name__) and "cross" not in name and "encoder" not in name:
            return name, child
    return None


def _is_linear_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "dim", lambda: 0)() == 2 and not isinstance(module, nn.Embedding)


def _find_projection(attention: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    found = None
    for name, module in attention.named_modules():
        if name and name.rsplit(".", 1)[-1] in names and _is_linear_like(module):
            found = (name, module)  # the last match: output projections come after q/k/v
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def resolve_site(model: nn.Module, layer: int | None, component: str) -> Site:
    """Resolve ``layer`` + ``component`` (or a module path) to a :class:`Site`."""
    if is_module_path(component):
        return _module_path_site(model, component)
    layers_path, layers = find_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise ReftConfigError(f"layer {layer} does not exist: {type(model).__name__} has {n} layers (valid 0..{n - 1})")
    index = layer % n
    block = layers[index]
    block_path = _join(layers_path, str(index))

    def site(rel: str, module: nn.Module, kind: HookKind, num_heads: int | None = None) -> Site:
        return Site(module, _join(block_path, rel), kind, component, index, num_heads)

    model_type = getattr(text_config(model), "model_type", None)
    override = COMPONENT_OVERRIDES.get(model_type or "", {}).get(component)
    if override is not None:
        rel, kind = override
        try:
            return site(rel, block.get_submodule(rel), kind)
        except AttributeError as exc:
            raise ArchitectureError(
                f"override for {model_type}/{component} points at {rel!r}, which layer {index} does not have"
            ) from exc

    if component == "block_input":
        return site("", block, "input")
    if component == "block_output":
        return site("", block, "output")

    attention = _find_child(block, _ATTENTION_NAMES, r"attention|attn")
    if component.startswith("attention") or component in ("head_output", *_QKV_NAMES):
        if attention is None:
            raise ArchitectureError(
                f"no attention module found in layer {index} of {type(model).__name__} "
                f"(children: {[n for n, _ in block.named_children()]}); use a module path such as "
                f"'{block_path}.<child>' or register an override with reftlib.register_component_override"
            )
        attn_name, attn = attention
        if component == "attention_input":
            return site(attn_name, attn, "input")
        if component == "attention_output":
            return site(attn_name, attn, "output")
        names = _OUTPUT_PROJ_NAMES if component == "head_output" else _QKV_NAMES[component]
        proj = _find_projection(attn, names)
        if proj is None:
            what = "attention output projection" if component == "head_output" else f"separate {component[:-7]} projection"
            hint = " (this model fuses q, k and v into one projection)" if component in _QKV_NAMES else ""
            raise ArchitectureError(
                f"{component} is not available on {type(model).__name__}: found no {what} named {list(names)} "
                f"inside {_join(block_path, attn_name)}{hint}; use a module path instead"
            )
        proj_name, proj_module = proj
        if component == "head_output":
            heads = getattr(text_config(model), "num_attention_heads", None)
            if not isinstance(heads, int):
                raise ArchitectureError("head_output needs config.num_attention_heads, which this model's config lacks")
            return site(_join(attn_name, proj_name), proj_module, "input", heads)
        return site(_join(attn_name, proj_name), proj_module, "output")

    mlp = _find_child(block, _MLP_NAMES, r"mlp|feedforward|moe")
    if mlp is None:
        raise ArchitectureError(
            f"no MLP module found in layer {index} of {type(model).__name__} "
            f"(children: {[n for n, _ in block.named_children()]}); use a module path such as "
            f"'{block_path}.<child>' or register an override with reftlib.register_component_override"
        )
    mlp_name, mlp_module = mlp
    return site(mlp_name, mlp_module, "input" if component == "mlp_input" else "output")


def _module_path_site(model: nn.Module, component: str) -> Site:
    path, _, kind = component.partition(":")
    kind = kind or "output"
    if kind not in ("input", "output"):
        raise ReftConfigError(f"module path {component!r} ends in {kind!r}; use ':input' or ':output'")
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        top = [n for n, _ in model.named_children()]
        raise ReftConfigError(
            f"module path {path!r} does not exist in {type(model).__name__} (top-level children: {top})"
        ) from exc
    layer = None
    try:
        layers_path, _ = find_layers(model)
        if path.startswith(layers_path + "."):
            layer = int(path[len(layers_path) + 1 :].split(".")[0])
    except (ArchitectureError, ValueError):
        pass
    return Site(module, path, kind, component, layer)  # type: ignore[arg-type]


def describe_structure(model: nn.Module) -> dict[str, str]:
    """Which module each component resolves to on layer 0 (handy for docs and debugging)."""
    out = {}
    for component in COMPONENTS:
        try:
            site = resolve_site(model, 0, component)
            out[component] = f"{site.path} ({site.kind})"
        except (ArchitectureError, ReftConfigError) as exc:
            out[component] = f"unavailable: {exc}"
    return out
