"""RepE-style reading vectors (Zou et al. 2023): a direction per layer from paired activations, added back.

:func:`repe_reading_vectors` collects the residual stream (``block_output``) of chosen layers at
the last token (or averaged over other positions) for texts of two classes, and reads one vector
per layer:

* ``method="mean_diff"``: mean of the positive activations minus mean of the negative ones;
* ``method="pca"``: the first principal component of the paired differences ``pos_i − neg_i``, with
  its sign aligned with the mean difference. RepE shuffles the order inside each pair before a
  centred PCA, so the differences point both ways and their mean is about zero; that PCA tends to
  the top eigenvector of ``E[d dᵀ]``, which is computed here exactly (the SVD of the uncentred
  differences), without the random signs.

With ``normalize=True`` (default) every vector has unit length, so ``alpha`` is a norm in the
residual stream's units. Otherwise ``mean_diff`` keeps the raw difference and ``pca`` the mean
difference's component along the principal direction.

:func:`repe_config` / :func:`apply_repe` add ``alpha · v_layer`` at every token of each layer with a
:class:`~reftlib.SteeringVectorIntervention` (frozen by default); :func:`tune_repe_alpha` picks
``alpha`` on validation data exactly as :func:`~reftlib.lofit.tune_iti_alpha` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import require_model, require_str_list, require_tokenizer
from ..collect import collect_activations
from ..components import find_layers
from ..config import ReftConfig
from ..errors import InputError, ReftConfigError
from ..interventions import SteeringVectorIntervention
from ..model import ReftModel, get_reft_model
from .iti import AlphaSearch, tune_alpha

__all__ = ["READING_METHODS", "ReadingVectors", "apply_repe", "repe_config", "repe_reading_vectors", "tune_repe_alpha"]

#: The ways :func:`repe_reading_vectors` reads a direction.
READING_METHODS = ("mean_diff", "pca")


@dataclass
class ReadingVectors:
    """One vector per layer (``vectors[layer]``: ``[hidden]``, float64) and how it was read.

    ``accuracies[layer]`` is the share of texts on the expected side of the midpoint between the two
    class means when projected on the vector (a quick check that the direction separates the classes).
    """

    vectors: dict[int, torch.Tensor]
    method: str
    component: str = "block_output"
    accuracies: dict[int, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_reft_config(self, alpha: float, layers: Iterable[int] | None = None, *,
                       trainable: bool = False) -> ReftConfig:
        """Same as :func:`repe_config`."""
        return repe_config(self, alpha, layers, trainable=trainable)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n, n_pos, d]`` -> ``[n, d]``: the mean over each text's real positions."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _read(pos: torch.Tensor, neg: torch.Tensor, method: str, normalize: bool) -> torch.Tensor:
    mean_diff = pos.mean(dim=0) - neg.mean(dim=0)
    if method == "mean_diff":
        vector = mean_diff
    else:
        diffs = pos - neg
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        direction = vh[0]
        if float(direction @ mean_diff) < 0:
            direction = -direction
        vector = direction if normalize else (direction @ mean_diff) * direction
    norm = vector.norm()
    if normalize and norm > 0:
        vector = vector / norm
    return vector


def _separation(pos: torch.Tensor, neg: torch.Tensor, vector: torch.Tensor) -> float:
    p, q = pos @ vector, neg @ vector
    middle = (p.mean() + q.mean()) / 2
    return (int((p > middle).sum()) + int((q < middle).sum())) / (len(p) + len(q))


def repe_reading_vectors(
    model: nn.Module,
    tokenizer: Any,
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    layers: Iterable[int],
    *,
    method: str = "mean_diff",
    positions: str = "l1",
    normalize: bool = True,
    component: str = "block_output",
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> ReadingVectors:
    """Read one vector per layer from texts of two classes (see the module docstring).

    Args:
        model: a Hugging Face model.
        tokenizer: its tokenizer.
        pos_texts: the class the vector points to. ``"pca"`` pairs ``pos_texts[i]`` with ``neg_texts[i]``,
            so it needs as many of each.
        neg_texts: the class the vector points away from.
        layers: the layers to read.
        method: ``"mean_diff"`` or ``"pca"``.
        positions: where to read each text: ``"l1"`` (last token) or a spec such as ``"all"`` or
            ``"l4"``, averaged over the text's positions.
        normalize: unit vectors (default), or the mean difference's scale (see the module docstring).
        component: the site of each layer (default ``block_output``, the residual stream after the layer;
            any component with one vector per token works).
        batch_size: texts per forward pass (passed to :func:`reftlib.collect_activations`, as are the next two).
        max_length: truncate longer texts to this many tokens.
        progress: show a progress bar.
    """
    where = "repe_reading_vectors"
    require_model(model, "model", where)
    require_tokenizer(tokenizer, "tokenizer", where)
    pos_texts = require_str_list(pos_texts, "pos_texts", where)
    neg_texts = require_str_list(neg_texts, "neg_texts", where)
    if method not in READING_METHODS:
        raise ReftConfigError(f"{where}(method=...) must be one of {list(READING_METHODS)}, got {method!r}")
    if method == "pca" and len(pos_texts) != len(neg_texts):
        raise InputError(f"{where}(method='pca') pairs pos_texts[i] with neg_texts[i]; got {len(pos_texts)} and "
                         f"{len(neg_texts)} texts. Pass as many of each, or use method='mean_diff'")
    if component == "head_output":
        raise ReftConfigError(f"{where}(component='head_output') is per head; use reftlib.lofit.iti_probe_heads "
                              "for heads, or a component with one vector per token such as 'block_output'")
    if isinstance(layers, int):
        layers = [layers]
    layers = [int(layer) for layer in layers]
    n_layers = len(find_layers(model)[1])
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= layer < n_layers for layer in layers):
        raise ReftConfigError(f"{where}(layers=...) must list distinct layers from 0 to {n_layers - 1}, got {layers}")
    texts = pos_texts + neg_texts
    acts = collect_activations(model, tokenizer, texts, [(layer, component) for layer in layers], positions=positions,
                               batch_size=batch_size, max_length=max_length, progress=progress)
    vectors: dict[int, torch.Tensor] = {}
    accuracies: dict[int, float] = {}
    n_pos = len(pos_texts)
    for layer in layers:
        values = _masked_mean(acts[(layer, component)].to(torch.float64), acts.mask)
        pos, neg = values[:n_pos], values[n_pos:]
        vectors[layer] = _read(pos, neg, method, normalize)
        accuracies[layer] = _separation(pos, neg, vectors[layer])
    settings = {"method": "repe", "positions": positions, "normalize": normalize, "pos_texts": n_pos,
                "neg_texts": len(neg_texts), "model_type": getattr(model.config, "model_type", None)}
    return ReadingVectors(vectors, method, component, accuracies, settings)


def repe_config(vectors: ReadingVectors, alpha: float, layers: Iterable[int] | None = None, *,
                trainable: bool = False, dtype: torch.dtype = torch.float32) -> ReftConfig:
    """``alpha · v_layer`` added at every token of each layer (all layers of ``vectors``, or ``layers``).

    One :class:`~reftlib.SteeringVectorIntervention` per layer (frozen unless ``trainable``) at the
    vectors' component, ``positions=None``. The vectors live in the instances: a second model the config
    is attached to gets a copy of them.
    """
    if not isinstance(vectors, ReadingVectors):
        raise ReftConfigError(f"repe_config(vectors=...) expects the ReadingVectors of repe_reading_vectors, "
                              f"got {type(vectors).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ReftConfigError(f"repe_config(alpha=...) must be a finite number, got {alpha!r}")
    chosen = list(vectors.vectors) if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in vectors.vectors]
    if missing or not chosen:
        raise ReftConfigError(f"repe_config: no vector for layer(s) {missing or chosen}; these vectors cover "
                              f"layers {sorted(vectors.vectors)}")
    reps = []
    for layer in chosen:
        vector = vectors.vectors[layer]
        iv = SteeringVectorIntervention(embed_dim=vector.numel(), trainable=trainable, dtype=dtype)
        iv.set_vector(float(alpha) * vector)
        reps.append({"layer": layer, "component": vectors.component, "positions": None, "intervention": iv})
    return ReftConfig(representations=reps)


def _dtype_for(model: nn.Module) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def apply_repe(model: nn.Module, vectors: ReadingVectors, alpha: float, layers: Iterable[int] | None = None, *,
               trainable: bool = False, adapter_name: str = "default") -> ReftModel:
    """``get_reft_model(model, repe_config(...))``: the model steered by ``alpha`` times the reading vectors."""
    require_model(model, "model", "apply_repe")
    config = repe_config(vectors, alpha, layers, trainable=trainable, dtype=_dtype_for(model))
    return get_reft_model(model, config, adapter_name=adapter_name)


def tune_repe_alpha(model: nn.Module, vectors: ReadingVectors, score_fn: Callable[[ReftModel], Any],
                    alphas: Sequence[float], layers: Iterable[int] | None = None, *,
                    metric: str | None = None) -> AlphaSearch:
    """Choose ``alpha`` on validation data: :func:`~reftlib.lofit.tune_alpha` over :func:`repe_config`."""
    require_model(model, "model", "tune_repe_alpha")
    chosen = None if layers is None else list(layers)
    dtype = _dtype_for(model)
    return tune_alpha(model, lambda alpha: repe_config(vectors, alpha, chosen, dtype=dtype), score_fn, alphas,
                      metric=metric)

