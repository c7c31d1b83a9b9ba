"""Inference-time intervention (ITI, Li et al. 2023): probe every head, shift the best ones, no training.

1. :func:`iti_probe_heads` collects each head's output at the last token of labelled texts
   (``pos_texts``: e.g. a question with a true answer; ``neg_texts``: with a false one) and fits one
   logistic-regression probe per head on a seeded train split (torch, L-BFGS; no scikit-learn).
   Heads are ranked by the probes' validation accuracy. For every head it also computes the
   *mass-mean-shift* direction (mean of the positive outputs minus mean of the negative ones, unit
   length) and ``σ_h``, the standard deviation of all outputs projected on that direction.
2. :func:`iti_config` / :func:`apply_iti` add ``α · σ_h · θ_h`` to the output of each of the top-K
   heads at every token: one :class:`~reftlib.HeadBiasIntervention` per layer holding these computed
   offsets, ``positions=None``. The result is an ordinary :class:`~reftlib.ReftModel`: it saves and
   loads like LoFiT's offsets and :meth:`~reftlib.ReftModel.merge_and_unload` folds it into the
   attention output projections.
3. :func:`tune_iti_alpha` picks ``α`` on validation data with any score function, e.g.
   :func:`reftlib.evaluation.truthfulqa_mc` on validation questions.

Example::

    probes = iti_probe_heads(model, tokenizer, true_texts, false_texts, groups=question_ids + question_ids)
    search = tune_iti_alpha(model, probes, lambda m: truthfulqa_mc(m, tokenizer, val_rows)["mc2"],
                            alphas=[0, 5, 10, 15, 20], k=16)
    reft_model = apply_iti(model, probes, k=16, alpha=search.best_alpha)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import require_model, require_str_list, require_tokenizer
from ..collect import collect_activations
from ..config import ReftConfig
from ..errors import InputError, ReftConfigError
from ..interventions import HeadBiasIntervention
from ..model import ReftModel, get_reft_model
from .selection import count_heads

__all__ = [
    "AlphaSearch",
    "ItiProbes",
    "apply_iti",
    "fit_linear_probes",
    "iti_config",
    "iti_probe_heads",
    "tune_alpha",
    "tune_iti_alpha",
]

Head = tuple[int, int]


# --------------------------------------------------------------------------- probes
def fit_linear_probes(features: torch.Tensor, labels: torch.Tensor, *, l2: float | None = None,
                      max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit independent L2-regularized logistic regressions, one per leading index, in float64.

    Args:
        features: ``[n_probes, n_examples, dim]``.
        labels: ``[n_examples]`` of 0/1.
        l2: weight of ``½‖w‖²`` added to each probe's mean log-loss; default ``1 / n_examples``, which
            is scikit-learn's ``LogisticRegression(C=1.0)`` (``C`` weights the summed loss).
        max_iter: L-BFGS iterations (all probes are optimized together; their losses are independent).

    Returns:
        ``(weights [n_probes, dim], biases [n_probes])``; a probe predicts 1 where ``x·w + b > 0``.
    """
    x = features.to(torch.float64)
    y = labels.to(torch.float64)
    n_probes, n, dim = x.shape
    l2 = 1.0 / n if l2 is None else float(l2)
    signs = 2.0 * y - 1.0
    weights = torch.zeros(n_probes, dim, dtype=torch.float64, requires_grad=True)
    biases = torch.zeros(n_probes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, biases], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("pnd,pd->pn", x, weights) + biases.unsqueeze(1)
        loss = nn.functional.softplus(-signs * logits).mean(dim=1) + 0.5 * l2 * weights.pow(2).sum(dim=1)
        total = loss.sum()
        total.backward()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach(), biases.detach()


def _accuracy(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("pnd,pd->pn", features.to(torch.float64), weights) + biases.unsqueeze(1)
    return ((logits > 0).to(torch.float64) == labels.to(torch.float64)).to(torch.float64).mean(dim=1)


def _split(groups: Sequence[Hashable], val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation example indices; examples of one group stay on one side."""
    order: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    members = list(order.values())
    perm = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
    val = sorted(i for g in perm[:n_val] for i in members[g])
    train = sorted(i for g in perm[n_val:] for i in members[g])
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


@dataclass
class ItiProbes:
    """What :func:`iti_probe_heads` learns about every head; rows are layers, columns heads.

    Attributes:
        accuracies: ``[layers, heads]`` validation accuracy of each head's probe (``nan`` for layers
            not probed).
        train_accuracies: ``[layers, heads]`` accuracy on the training split.
        directions: ``[layers, heads, head_dim]`` unit mass-mean-shift directions (positive mean minus
            negative mean), float64.
        sigmas: ``[layers, heads]`` std of the outputs projected on each direction (all examples), float64.
        settings: how they were obtained (split sizes, seed, ...).
    """

    accuracies: torch.Tensor
    train_accuracies: torch.Tensor
    directions: torch.Tensor
    sigmas: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.accuracies.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.accuracies.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.directions.shape[-1])

    def ranking(self) -> list[Head]:
        """Every probed ``(layer, head)``, best validation accuracy first (ties: lower layer, then head)."""
        scores = torch.nan_to_num(self.accuracies.flatten().to(torch.float64), nan=-1.0)
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        probed = int((~torch.isnan(self.accuracies)).sum())
        return [(i // self.num_heads, i % self.num_heads) for i in order[:probed]]

    def top(self, k: int | None = None, *, fraction: float | None = None) -> list[Head]:
        """The ``k`` best heads (or a ``fraction`` of all heads; default 5 %, ITI's 48 of LLaMA-7B's 1024)."""
        ranking = self.ranking()
        return ranking[: _resolve_k(k, fraction, self.num_layers * self.num_heads, len(ranking))]

    def offset(self, layer: int, head: int, alpha: float) -> torch.Tensor:
        """``α · σ_h · θ_h``: what ITI adds to head ``(layer, head)``'s output (``[head_dim]``, float64)."""
        return float(alpha) * self.sigmas[layer, head] * self.directions[layer, head]

    def to_reft_config(self, k: int | None = None, *, alpha: float, fraction: float | None = None,
                       heads: Iterable[Sequence[int]] | None = None) -> ReftConfig:
        """Same as :func:`iti_config`."""
        return iti_config(self, k, alpha=alpha, fraction=fraction, heads=heads)

    def __repr__(self) -> str:
        best = ", ".join(f"({layer}, {head}): {float(self.accuracies[layer, head]):.3f}"
                         for layer, head in self.ranking()[:5])
        return f"ItiProbes([{self.num_layers}x{self.num_heads}] heads, best: {best})"


def _resolve_k(k: int | None, fraction: float | None, total: int, available: int) -> int:
    if k is not None and fraction is not None:
        raise ReftConfigError("give k (a number of heads) or fraction (of all heads), not both")
    if k is None:
        fraction = 0.05 if fraction is None else fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ReftConfigError(f"fraction must be in (0, 1], got {fraction!r}")
        k = min(max(1, math.floor(total * fraction + 0.5)), available)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        raise ReftConfigError(f"k must be an integer from 1 to {available} (the number of probed heads), got {k!r}")
    return k


def iti_probe_heads(
    model: nn.Module,
    tokenizer: Any,
    pos_texts: Sequence[str],
    neg_texts: Sequence[str],
    *,
    layers: Iterable[int] | None = None,
    groups: Sequence[Hashable] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    l2: float | None = None,
    max_iter: int = 200,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> ItiProbes:
    """Fit a linear probe on every head's last-token output; compute ITI's directions and scales.

    Args:
        model: a Hugging Face model (the base model; its ``head_output`` sites are read).
        tokenizer: its tokenizer (needs a pad token unless ``batch_size=1``).
        pos_texts: texts of the class to move towards (ITI: question + true answer), label 1.
        neg_texts: texts of the other class (question + false answer), label 0.
        layers: layers to probe (default: all). Other layers get ``nan`` accuracies and are never selected.
        groups: one key per text, in the order ``pos_texts + neg_texts``; texts sharing a key land in the
            same split (ITI splits by question, so a question's answers never straddle train and validation).
            Default: every text on its own.
        val_fraction: share of the groups held out for validation (ITI: 0.2); ``seed`` fixes the split.
        l2: probe regularization (see :func:`fit_linear_probes`).
        max_iter: L-BFGS iterations of the probes.
        batch_size: texts per forward pass (passed to :func:`reftlib.collect_activations`, as are the next two).
        max_length: truncate longer texts to this many tokens.
        progress: show a progress bar.

    Returns:
        :class:`ItiProbes` (``.top(k)``, ``.accuracies``, ``.directions``, ``.sigmas``).

    The directions and scales use every example (train and validation), as in ITI's code.
    """
    where = "iti_probe_heads"
    require_model(model, "model", where)
    require_tokenizer(tokenizer, "tokenizer", where)
    pos_texts = require_str_list(pos_texts, "pos_texts", where)
    neg_texts = require_str_list(neg_texts, "neg_texts", where)
    num_layers, num_heads = count_heads(model)
    wanted = list(range(num_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in wanted if not 0 <= layer < num_layers]
    if not wanted or bad or len(set(wanted)) != len(wanted):
        raise ReftConfigError(f"{where}(layers=...) must list distinct layers from 0 to {num_layers - 1}, got {wanted}")
    if not 0 < val_fraction < 1:
        raise ReftConfigError(f"{where}(val_fraction=...) must be between 0 and 1, got {val_fraction!r}")
    n = len(pos_texts) + len(neg_texts)
    if groups is None:
        groups = list(range(n))
    elif isinstance(groups, (str, bytes)) or len(groups) != n:
        raise InputError(f"{where}(groups=...) needs one key per text ({n}, pos_texts then neg_texts), got "
                         f"{len(groups) if not isinstance(groups, (str, bytes)) else 'a string'}")
    train, val = _split(groups, val_fraction, seed) if len(set(groups)) >= 2 else (None, None)
    labels = torch.cat([torch.ones(len(pos_texts)), torch.zeros(len(neg_texts))]).to(torch.float64)
    if train is None or labels[train].unique().numel() < 2:
        raise InputError(f"{where}: the training split needs texts of both classes; pass more texts (got "
                         f"{len(pos_texts)} positive, {len(neg_texts)} negative in {len(set(groups))} group(s))")
    acts = collect_activations(model, tokenizer, pos_texts + neg_texts, [(layer, "head_output") for layer in wanted],
                               positions="l1", batch_size=batch_size, max_length=max_length, progress=progress)
    # [n, probed layers, heads, head_dim] -> [probes, n, head_dim]
    x = torch.stack([acts[(layer, "head_output")][:, 0] for layer in wanted], dim=1).to(torch.float64)
    head_dim = x.shape[-1]
    features = x.permute(1, 2, 0, 3).reshape(len(wanted) * num_heads, n, head_dim)
    weights, biases = fit_linear_probes(features[:, train], labels[train], l2=l2, max_iter=max_iter)
    val_acc = _accuracy(features[:, val], labels[val], weights, biases)
    train_acc = _accuracy(features[:, train], labels[train], weights, biases)

    shift = features[:, labels == 1].mean(dim=1) - features[:, labels == 0].mean(dim=1)
    norms = shift.norm(dim=-1, keepdim=True)
    directions = torch.where(norms > 0, shift / norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    sigmas = torch.einsum("pnd,pd->pn", features, directions).std(dim=1, correction=0)

    def full(values: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((num_layers, num_heads, *values.shape[1:]), fill, dtype=torch.float64)
        out[wanted] = values.reshape(len(wanted), num_heads, *values.shape[1:])
        return out

    settings = {"method": "iti", "layers": wanted, "val_fraction": val_fraction, "seed": seed,
                "train_examples": len(train), "val_examples": len(val), "pos_texts": len(pos_texts),
                "neg_texts": len(neg_texts), "l2": 1.0 / len(train) if l2 is None else l2,
                "model_type": getattr(model.config, "model_type", None)}
    return ItiProbes(full(val_acc, math.nan), full(train_acc, math.nan), full(directions, 0.0),
                     full(sigmas, 0.0), settings)


# --------------------------------------------------------------------------- the intervention
def _check_probes(probes: Any, where: str) -> ItiProbes:
    if not isinstance(probes, ItiProbes):
        raise ReftConfigError(f"{where}(probes=...) expects the ItiProbes returned by iti_probe_heads, "
                              f"got {type(probes).__name__}")
    return probes


def iti_config(probes: ItiProbes, k: int | None = None, *, alpha: float, fraction: float | None = None,
               heads: Iterable[Sequence[int]] | None = None, dtype: torch.dtype = torch.float32) -> ReftConfig:
    """ITI as a config: ``α · σ_h · θ_h`` added to each selected head's output at every token.

    Args:
        probes: from :func:`iti_probe_heads`.
        k: number of heads, best probe accuracy first (or ``fraction`` of all heads; default 5 %).
        alpha: the strength ``α`` (ITI: 15 on LLaMA-7B; tune it with :func:`tune_iti_alpha`).
        heads: explicit ``(layer, head)`` pairs instead of the top ``k``.
        dtype: the offsets' dtype (they are added in the model's dtype).

    Returns:
        a :class:`~reftlib.ReftConfig` with one :class:`~reftlib.HeadBiasIntervention` per layer
        (``component="head_output"``, ``positions=None``) holding the computed offsets. The offsets live
        in the instances: every model the config is attached to (:func:`~reftlib.get_reft_model`)
        gets them, the first one the instances themselves and later ones copies.
    """
    probes = _check_probes(probes, "iti_config")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ReftConfigError(f"iti_config(alpha=...) must be a finite number, got {alpha!r}")
    if heads is None:
        chosen = probes.top(k, fraction=fraction)
    else:
        if k is not None or fraction is not None:
            raise ReftConfigError("iti_config: give heads= or k/fraction, not both")
        chosen = []
        for item in heads:
            if not (isinstance(item, Sequence) and len(item) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
                raise ReftConfigError(f"iti_config(heads=...) expects (layer, head) integer pairs, got {item!r}")
            layer, head = item
            if not (0 <= layer < probes.num_layers and 0 <= head < probes.num_heads):
                raise ReftConfigError(f"iti_config: head ({layer}, {head}) does not exist "
                                      f"({probes.num_layers} layers x {probes.num_heads} heads)")
            chosen.append((layer, head))
        if not chosen or len(set(chosen)) != len(chosen):
            raise ReftConfigError(f"iti_config(heads=...) must list at least one head, each once; got {chosen}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        by_layer.setdefault(layer, []).append(head)
    reps = []
    for layer, hs in by_layer.items():
        iv = HeadBiasIntervention(heads=hs, num_heads=probes.num_heads, head_dim=probes.head_dim, init_std=0.0,
                                  dtype=dtype)
        with torch.no_grad():
            iv.bias.copy_(torch.stack([probes.offset(layer, h, alpha) for h in hs]).to(iv.bias.dtype))
        reps.append({"layer": layer, "component": "head_output", "positions": None, "intervention": iv})
    return ReftConfig(representations=reps)


def apply_iti(model: nn.Module, probes: ItiProbes, k: int | None = None, *, alpha: float,
              fraction: float | None = None, heads: Iterable[Sequence[int]] | None = None,
              adapter_name: str = "default") -> ReftModel:
    """``get_reft_model(model, iti_config(...))``: the model with ITI's offsets, in its current mode.

    The offsets are stored in the model's dtype when it is float64, else in float32.
    """
    require_model(model, "model", "apply_iti")
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    config = iti_config(probes, k, alpha=alpha, fraction=fraction, heads=heads, dtype=dtype)
    return get_reft_model(model, config, adapter_name=adapter_name)


# --------------------------------------------------------------------------- choosing alpha
@dataclass
class AlphaSearch:
    """The result of :func:`tune_alpha`: the score of every ``α`` tried and the best one (highest score;
    ties go to the ``α`` listed first). ``results`` keeps what the score function returned."""

    best_alpha: float
    scores: dict[float, float]
    results: dict[float, Any] = field(default_factory=dict)

    @property
    def best_score(self) -> float:
        return self.scores[self.best_alpha]


def tune_alpha(model: nn.Module, make_config: Callable[[float], ReftConfig], score_fn: Callable[[ReftModel], Any],
               alphas: Sequence[float], *, metric: str | None = None, adapter_name: str = "default") -> AlphaSearch:
    """Score ``model`` with the interventions of ``make_config(α)`` for each ``α``; keep the best.

    ``score_fn(reft_model)`` returns a number (higher is better) or a mapping, in which case ``metric``
    names the entry to maximize (``"mc2"`` for :func:`reftlib.evaluation.truthfulqa_mc`). The
    interventions are detached after each ``α``: ``model`` comes back with the hooks, ``requires_grad``
    flags and train/eval mode it had.
    """
    require_model(model, "model", "tune_alpha")
    alphas = list(alphas)
    if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) for a in alphas):
        raise ReftConfigError(f"tune_alpha(alphas=...) must be a non-empty list of finite numbers, got {alphas!r}")
    if not callable(score_fn):
        raise ReftConfigError("tune_alpha(score_fn=...) must be a function of the ReftModel returning a score")
    scores: dict[float, float] = {}
    results: dict[float, Any] = {}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for alpha in alphas:
        reft_model = None
        try:
            reft_model = get_reft_model(model, make_config(float(alpha)), adapter_name=adapter_name)
            reft_model.train(was_training)
            result = score_fn(reft_model)
        finally:
            if reft_model is not None:
                reft_model.detach()
            for param, flag in flags:
                param.requires_grad_(flag)
            model.train(was_training)
        if isinstance(result, Mapping):
            if metric is None or metric not in result:
                raise ReftConfigError(f"tune_alpha: score_fn returned {sorted(result)}; pass metric= naming the "
                                      "entry to maximize (e.g. metric='mc2')")
            score = result[metric]
        else:
            score = result
        try:
            score = float(score)
        except (TypeError, ValueError) as exc:
            raise ReftConfigError(f"tune_alpha: score_fn returned {type(score).__name__}, not a number") from exc
        if not math.isfinite(score):
            raise InputError(f"tune_alpha: the score at alpha={alpha} is {score}; check score_fn and the model")
        scores[float(alpha)] = score
        results[float(alpha)] = result
    best = max(scores, key=lambda a: (scores[a], -list(scores).index(a)))
    return AlphaSearch(best, scores, results)


def tune_iti_alpha(model: nn.Module, probes: ItiProbes, score_fn: Callable[[ReftModel], Any],
                   alphas: Sequence[float] = (0.0, 5.0, 10.0, 15.0, 20.0), k: int | None = None, *,
                   fraction: float | None = None, heads: Iterable[Sequence[int]] | None = None,
                   metric: str | None = None) -> AlphaSearch:
    """Choose ITI's ``α`` on validation data: :func:`tune_alpha` over :func:`iti_config` with these heads.

    Example: ``tune_iti_alpha(model, probes, lambda m: truthfulqa_mc(m, tok, val_rows, progress=False),
    metric="mc2", k=16)``. Apply the result with ``apply_iti(model, probes, k=16, alpha=search.best_alpha)``.
    """
    require_model(model, "model", "tune_iti_alpha")
    probes = _check_probes(probes, "tune_iti_alpha")
    chosen = list(heads) if heads is not None else probes.top(k, fraction=fraction)
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    return tune_alpha(model, lambda alpha: iti_config(probes, alpha=alpha, heads=chosen, dtype=dtype), score_fn,
                      alphas, metric=metric)
