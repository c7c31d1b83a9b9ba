"""Collecting activations: one pass over a dataset, representations at any sites and positions.

Probing methods (ITI's linear probes, RepE's reading vectors, steering vectors) and analyses start
from the hidden states a model computes on a set of texts. :func:`collect_activations` runs the
texts through the model in batches and keeps, for every requested site, the vectors at the
requested positions of each text::

    from reftlib.collect import collect_activations

    acts = collect_activations(model, tokenizer, texts,
                               sites=[(6, "block_output"), (6, "head_output")], positions="l1")
    acts[(6, "block_output")].shape     # [n_texts, 1, hidden]
    acts[(6, "head_output")].shape      # [n_texts, 1, heads, head_dim]

* Sites are ``(layer, component)`` pairs resolved with :func:`reftlib.components.resolve_site`
  (any component of :data:`reftlib.COMPONENTS`, or ``(None, "model.layers.3.mlp:input")`` for a
  module path). ``head_output`` is returned per head.
* Positions are a spec (``"l1"``: each text's last token, ``"f3+l3"``, ``"all"``) or explicit token
  indices per text. They are resolved on each row's real tokens from the attention mask, so left
  and right padding give the same vectors as running each text alone (with left padding the
  position ids are computed from the mask too).
* The hooks are temporary forward hooks, removed when the pass ends, also when it fails; the
  model's own hooks (a :class:`~reftlib.ReftModel`'s included) are left as they were.
* With ``to_disk=folder`` the vectors go to safetensors shards written atomically as the pass goes
  (for runs larger than memory); :func:`load_activations` reads them back.

Given a :class:`~reftlib.ReftModel`, the vectors are what that model computes: its active
interventions act (at their configured positions, resolved on each text) and a site where an
intervention acts is read *after* the edit. Pass ``reft_model.model`` for the base model's
activations, or collect inside ``with reft_model.disable_interventions():``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_write_bytes
from .checks import (
    describe,
    registered_reft_model_class,
    require_model,
    require_str_list,
    require_tokenizer,
    unwrap_model,
)
from .components import COMPONENTS, Site, is_module_path, resolve_site, text_config
from .errors import ArchitectureError, CheckpointError, InputError, PositionError, ReftConfigError
from .positions import parse_position_spec, resolve_position_spec

__all__ = [
    "ACTIVATIONS_INDEX",
    "Activations",
    "SiteSpec",
    "collect_activations",
    "iter_activation_shards",
    "load_activations",
]

#: A site to collect: ``(layer, component)``; ``(None, "module.path[:input]")`` for a module path.
SiteSpec = tuple[int | None, str]

#: The index file of a folder written with ``to_disk=``; it is written last, so it only ever lists complete shards.
ACTIVATIONS_INDEX = "activations.json"
_FORMAT = "reftlib-activations"
_FORMAT_VERSION = 1
_WHERE = "collect_activations"


class Activations(dict):
    """``site -> tensor`` of collected vectors, plus where each one was taken.

    Each value is ``[n_texts, n_positions, width]`` (``head_output``: ``[n_texts, n_positions,
    heads, head_dim]``) on the CPU. ``positions`` (``[n_texts, n_positions]``, long) holds the index
    of each vector's token within its text (as the tokenizer encodes it, special tokens included),
    ``-1`` where a text has no token there (``"all"`` or ``"f3+l3"`` on a short text); ``mask`` is
    ``positions >= 0``. Vectors at ``-1`` positions are zero.
    """

    def __init__(self, data: dict[SiteSpec, torch.Tensor], positions: torch.Tensor) -> None:
        super().__init__(data)
        self.positions = positions

    @property
    def mask(self) -> torch.Tensor:
        """``[n_texts, n_positions]`` bool: which entries are real tokens."""
        return self.positions >= 0

    def __repr__(self) -> str:
        shapes = ", ".join(f"{site}: {tuple(t.shape)}" for site, t in self.items())
        return f"Activations({shapes})"


# --------------------------------------------------------------------------- arguments
def _normalize_sites(model: nn.Module, sites: Any) -> list[tuple[SiteSpec, Site]]:
    example = "sites=[(6, 'block_output'), (6, 'head_output')]"
    if isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[1], str):
        raise ReftConfigError(f"{_WHERE}(sites=...) got one site {sites!r}; pass a list of sites: [{sites!r}]")
    if isinstance(sites, (str, bytes)) or not isinstance(sites, Sequence) or not sites:
        raise ReftConfigError(f"{_WHERE}(sites=...) expects a non-empty list of (layer, component) pairs, "
                              f"got {describe(sites)}; e.g. {example}")
    resolved: list[tuple[SiteSpec, Site]] = []
    seen: set[SiteSpec] = set()
    for item in sites:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str)
                and (item[0] is None or (isinstance(item[0], int) and not isinstance(item[0], bool)))):
            raise ReftConfigError(f"{_WHERE}: site {item!r} is not a (layer, component) pair; e.g. {example}")
        layer, component = item
        if not is_module_path(component) and component not in COMPONENTS:
            raise ReftConfigError(f"{_WHERE}: unknown component {component!r} in site {tuple(item)!r}; use one of "
                                  f"{list(COMPONENTS)} or a module path such as 'model.layers.3.mlp:input'")
        if layer is None and not is_module_path(component):
            raise ReftConfigError(f"{_WHERE}: site {tuple(item)!r} needs a layer index for component {component!r}")
        key = (layer, component)
        if key in seen:
            raise ReftConfigError(f"{_WHERE}: site {key!r} is listed twice; list each site once")
        seen.add(key)
        resolved.append((key, resolve_site(model, layer, component)))
    return resolved


def _normalize_positions(positions: Any, n_texts: int) -> tuple[str, tuple[int, int] | None] | list[list[int]]:
    """``("spec", parsed)`` for a spec string (``parsed`` None for "all"), else the explicit index lists."""
    if isinstance(positions, str):
        return positions, parse_position_spec(positions)
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence):
        raise PositionError(f"{_WHERE}(positions=...) expects a spec such as 'l1', 'f3+l3' or 'all', or one list of "
                            f"token indices per text, got {describe(positions)}")
    rows = list(positions)
    if len(rows) != n_texts:
        raise PositionError(f"{_WHERE}(positions=...) gives {len(rows)} lists of token indices for {n_texts} texts; "
                            "give one list per text (or a spec such as 'l1')")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if not isinstance(row, Sequence) or isinstance(row, str) or not row or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in row):
            raise PositionError(f"{_WHERE}(positions=...): entry {i} is {row!r}; give a non-empty list of token "
                                "indices >= 0 (use the spec 'l1' for each text's last token)")
        if len(set(row)) != len(row):
            raise PositionError(f"{_WHERE}(positions=...): entry {i} lists a token twice ({row}); list each once")
        out.append([int(x) for x in row])
    return out


def _max_positions(model: nn.Module) -> int | None:
    config = text_config(model)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def _accepts_position_ids(model: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- one batch
def _batch_positions(spec: Any, mask: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded, in_text)``: ``[batch, n]`` column indices into the padded batch and token indices within
    each text, ``-1`` where a row has no token there."""
    batch, length = mask.shape
    counts = mask.sum(dim=1)
    real = resolve_position_spec(f"f{max(length, 1)}", mask)  # columns of each row's real tokens, in order
    if isinstance(spec, tuple):
        text, parsed = spec
        if parsed is None:  # "all"
            width = int(counts.max())
            in_text = torch.arange(width).expand(batch, width)
            in_text = torch.where(in_text < counts.unsqueeze(1), in_text, -1)
        else:
            padded = resolve_position_spec(text, mask)
            rank = mask.long().cumsum(dim=1) - 1  # column -> index of that token within its row
            in_text = torch.where(padded >= 0, rank.gather(1, padded.clamp(min=0)), -1)
            return padded, in_text
    else:
        width = max(len(row) for row in spec)
        in_text = torch.full((batch, width), -1, dtype=torch.long)
        for b, row in enumerate(spec):
            too_far = [x for x in row if x >= int(counts[b])]
            if too_far:
                raise PositionError(f"{_WHERE}(positions=...): text {first + b} has {int(counts[b])} tokens but "
                                    f"positions ask for token(s) {too_far} (valid 0..{int(counts[b]) - 1})")
            in_text[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    padded = torch.where(in_text >= 0, real.gather(1, in_text.clamp(min=0)), -1)
    return padded, in_text


def _hooked_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _gather(hidden: torch.Tensor, padded: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    if hidden.dim() == 2 and hidden.shape[0] == batch * length:  # models that flatten [batch, seq] (OPT's MLP)
        hidden = hidden.unflatten(0, (batch, length))
    if hidden.dim() < 3 or hidden.shape[0] != batch or hidden.shape[1] != length:
        raise ArchitectureError(f"{_WHERE}: expected a [batch={batch}, seq={length}, ...] tensor at this site, "
                                f"got shape {tuple(hidden.shape)}; choose another component or module path")
    pos = padded.to(hidden.device)
    rows = torch.arange(batch, device=hidden.device).unsqueeze(1).expand_as(pos)
    picked = hidden.detach()[rows, pos.clamp(min=0)]
    valid = (pos >= 0).reshape(*pos.shape, *([1] * (picked.dim() - 2)))
    return torch.where(valid, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def _register(sites: list[tuple[SiteSpec, Site]], store: dict[SiteSpec, Any], state: dict[str, Any]) -> list[Any]:
    """One temporary hook per site; each gathers the batch's positions as soon as the tensor passes."""
    handles = []
    for key, site in sites:
        def take(value: Any, key: SiteSpec = key) -> None:
            tensor = _hooked_tensor(value)
            if tensor is not None and key not in store:  # a module run twice in one forward: its first call
                store[key] = _gather(tensor, state["padded"], state["batch"], state["length"]).cpu()

        if site.kind == "input":
            def pre(module, args, kwargs, take=take):
                take(args[0] if args else kwargs.get("hidden_states"))
            handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output, take=take):
                take(output)
            handles.append(site.module.register_forward_hook(post))
    return handles


# --------------------------------------------------------------------------- disk
def _tensor_name(index: int) -> str:
    return f"site_{index}"


def _pad_cat(parts: list[torch.Tensor], fill: float | int = 0) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        if p.shape[1] < width:
            extra = p.new_full((p.shape[0], width - p.shape[1], *p.shape[2:]), fill)
            p = torch.cat([p, extra], dim=1)
        padded.append(p)
    return torch.cat(padded, dim=0)


def _write_shard(folder: Path, number: int, keys: list[SiteSpec], parts: dict[SiteSpec, list[torch.Tensor]],
                 positions: list[torch.Tensor]) -> dict[str, Any]:
    name = f"activations-{number:05d}.safetensors"
    tensors = {_tensor_name(i): _pad_cat(parts[key]).contiguous() for i, key in enumerate(keys)}
    tensors["positions"] = _pad_cat(positions, -1).contiguous()
    atomic_write_bytes(folder / name, save(tensors))
    return {"file": name, "n": int(tensors["positions"].shape[0])}


# --------------------------------------------------------------------------- the pass
@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    sites: Sequence[SiteSpec],
    positions: str | Sequence[Sequence[int]] = "l1",
    *,
    batch_size: int = 8,
    progress: bool = True,
    to_disk: str | os.PathLike | None = None,
    shard_size: int = 4096,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    dtype: torch.dtype | None = None,
) -> Activations | Path:
    """Run ``texts`` through ``model`` once and keep the vectors at ``sites`` and ``positions``.

    Args:
        model: a Hugging Face model, or a :class:`~reftlib.ReftModel` (its active interventions act and
            the vectors are read after their edits; see the module docstring). It is used in its current
            mode: call ``model.eval()`` first so that dropout is off.
        tokenizer: its tokenizer. Batches are padded on the tokenizer's ``padding_side`` (it needs a
            pad token unless ``batch_size=1``).
        texts: the texts, encoded with ``add_special_tokens`` (e.g. a leading ``<s>``).
        sites: ``(layer, component)`` pairs, e.g. ``[(6, "block_output"), (6, "head_output")]``;
            ``(None, "model.layers.3.mlp:input")`` for a module path.
        positions: ``"l1"`` (each text's last token), another spec (``"f3+l3"``, ``"all"``: every token,
            shorter texts padded with ``-1`` positions), or one list of token indices per text
            (indices into the text's own tokens, special tokens included).
        batch_size: texts per forward pass.
        progress: show a progress bar.
        to_disk: a folder: write the vectors as safetensors shards of ``shard_size`` texts (each written
            atomically, the index :data:`ACTIVATIONS_INDEX` last) and return the folder's path; read it with
            :func:`load_activations` or :func:`iter_activation_shards`.
        max_length: truncate longer texts to this many tokens (default: texts longer than the model's
            position table are refused).
        dtype: cast the collected vectors (default: the model's dtype at each site).

    Returns:
        :class:`Activations`: ``{(layer, component): tensor}`` with ``[n_texts, n_positions, width]``
        tensors (``head_output``: ``[n_texts, n_positions, heads, head_dim]``) on the CPU, keyed by the
        sites as given, and ``.positions``/``.mask``. With ``to_disk``: the folder's :class:`~pathlib.Path`.

    Raises:
        ArgumentTypeError: ``model``, ``tokenizer`` or ``texts`` is the wrong kind of object.
        ReftConfigError: a malformed site, an unknown component, a bad ``batch_size``, no pad token.
        PositionError: malformed positions, or indices past the end of a text.
        InputError: an empty list of texts, a text with no tokens, or one longer than the model handles.
    """
    require_model(model, "model", _WHERE, allow_reft_model=True)
    require_tokenizer(tokenizer, "tokenizer", _WHERE)
    texts = require_str_list(texts, "texts", _WHERE)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReftConfigError(f"{_WHERE}({name}=...) must be a positive integer, got {value!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ReftConfigError(f"{_WHERE}(max_length=...) must be a positive integer or None, got {max_length!r}")
    inner = unwrap_model(model)
    base = inner.model if isinstance(inner, registered_reft_model_class()) else inner
    resolved = _normalize_sites(base, sites)
    spec = _normalize_positions(positions, len(texts))
    if getattr(tokenizer, "pad_token", None) is None and batch_size > 1 and len(texts) > 1:
        raise ReftConfigError(f"{_WHERE}: the tokenizer has no pad token, needed to batch texts; set one "
                              "(tokenizer.pad_token = tokenizer.eos_token) or pass batch_size=1")
    limit = _max_positions(base)
    device = _input_device(base)
    position_ids_ok = _accepts_position_ids(base)
    keys = [key for key, _ in resolved]

    folder = Path(to_disk) if to_disk is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ACTIVATIONS_INDEX).unlink(missing_ok=True)  # a reader never pairs an old index with new shards
    parts: dict[SiteSpec, list[torch.Tensor]] = {key: [] for key in keys}
    position_parts: list[torch.Tensor] = []
    shards: list[dict[str, Any]] = []
    widths: dict[SiteSpec, list[int]] = {}
    state: dict[str, Any] = {}
    store: dict[SiteSpec, torch.Tensor] = {}
    handles = _register(resolved, store, state)
    try:
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="collect", disable=not progress, leave=False):
            chunk = texts[start:start + batch_size]
            encoded = tokenizer(chunk, padding=len(chunk) > 1, return_tensors="pt", add_special_tokens=add_special_tokens,
                                truncation=max_length is not None, max_length=max_length)
            ids, mask = encoded["input_ids"], encoded.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            counts = mask.sum(dim=1)
            if bool((counts == 0).any()):
                row = int((counts == 0).nonzero()[0])
                raise InputError(f"{_WHERE}: text {start + row} ({chunk[row]!r}) has no tokens; remove it or pass "
                                 "add_special_tokens=True with a tokenizer that adds a BOS token")
            if limit is not None and ids.shape[1] > limit:
                row = int(counts.argmax())
                raise InputError(f"{_WHERE}: text {start + row} has {int(counts[row])} tokens but the model handles at "
                                 f"most {limit}; pass max_length={limit} to truncate")
            rows = spec if isinstance(spec, tuple) else spec[start:start + len(chunk)]
            padded, in_text = _batch_positions(rows, mask, start)
            batch, length = ids.shape
            state.update(padded=padded, batch=batch, length=length)
            store.clear()
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
            left_padded = bool((mask[:, 0] == 0).any())
            if left_padded and position_ids_ok:  # each text at the positions it has when run alone
                inputs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0).to(device)
            model(**inputs)
            for key, site in resolved:
                if key not in store:
                    raise ArchitectureError(f"{_WHERE}: site {key!r} ({site.path}, {site.kind}) never received a "
                                            "tensor during the forward pass; choose another component or module path")
                value = store[key]
                if site.num_heads:
                    value = value.unflatten(-1, (site.num_heads, value.shape[-1] // site.num_heads))
                if dtype is not None:
                    value = value.to(dtype)
                parts[key].append(value)
                widths.setdefault(key, list(value.shape[2:]))
            position_parts.append(in_text)
            if folder is not None and sum(p.shape[0] for p in position_parts) >= shard_size:
                shards.append(_write_shard(folder, len(shards), keys, parts, position_parts))
                parts = {key: [] for key in keys}
                position_parts = []
    finally:
        for handle in handles:
            handle.remove()
        store.clear()
    if folder is None:
        return Activations({key: _pad_cat(parts[key]) for key in keys}, _pad_cat(position_parts, -1))
    if position_parts:
        shards.append(_write_shard(folder, len(shards), keys, parts, position_parts))
    index = {
        "format": _FORMAT, "format_version": _FORMAT_VERSION, "n_texts": len(texts),
        "positions": positions if isinstance(positions, str) else "explicit",
        "sites": [{"layer": key[0], "component": key[1], "tensor": _tensor_name(i), "shape": widths[key]}
                  for i, key in enumerate(keys)],
        "shards": shards,
    }
    atomic_write_bytes(folder / ACTIVATIONS_INDEX, (json.dumps(index, indent=1) + "\n").encode("utf-8"))
    return folder


# --------------------------------------------------------------------------- reading back
def _read_index(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    folder = Path(folder)
    path = folder / ACTIVATIONS_INDEX
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no {ACTIVATIONS_INDEX}; write it with "
                              "collect_activations(..., to_disk=folder) (the index is written when the pass completes)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if index.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a reftlib activations index")
    if index.get("format_version", 0) > _FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer reftlib; upgrade with `pip install -U reftlib`")
    return folder, index


def iter_activation_shards(folder: str | os.PathLike) -> Iterator[Activations]:
    """The shards of a folder written by ``collect_activations(..., to_disk=folder)``, one :class:`Activations` each,
    in the order of the texts (for data sets larger than memory)."""
    folder, index = _read_index(folder)
    for shard in index["shards"]:
        path = folder / shard["file"]
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        data = {(site["layer"], site["component"]): tensors[site["tensor"]] for site in index["sites"]}
        yield Activations(data, tensors["positions"])


def load_activations(folder: str | os.PathLike) -> Activations:
    """All the vectors of a folder written by ``collect_activations(..., to_disk=folder)``, as one :class:`Activations`
    (the same tensors :func:`collect_activations` returns without ``to_disk``)."""
    shards = list(iter_activation_shards(folder))
    if not shards:
        raise CheckpointError(f"{folder} lists no shards")
    keys = list(shards[0])
    return Activations({key: _pad_cat([s[key] for s in shards]) for key in keys},
                       _pad_cat([s.positions for s in shards], -1))
