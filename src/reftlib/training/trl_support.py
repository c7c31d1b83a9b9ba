"""Training a ReftModel with TRL's ``SFTTrainer`` and ``DPOTrainer`` (``pip install "reftlib[trl]"``).

TRL (1.x) computes log-probabilities with a fused LM head: it replaces ``model.forward`` with a
function that runs ``model.base_model`` and the output head itself. On a ``ReftModel`` that skips
``ReftModel.forward``, which plans each call, so no intervention acts and training silently
changes nothing. :func:`prepare_for_trl` undoes that patch and puts the fused head on the Hugging
Face model inside the ReftModel: TRL's calls then go through ``ReftModel.forward`` (which passes
``labels`` and ``fused_lm_head`` on) and the interventions act. See ``docs/distributed.md``, "TRL".
"""

from __future__ import annotations

from typing import Any

from ..checks import require_reft_model, unwrap_model
from ..errors import MissingDependencyError

__all__ = ["TRL_FUSED_OUTPUTS", "prepare_for_trl"]

#: Every per-token field TRL's trainers read from the fused head (SFT: log_probs, entropy,
#: is_top1; DPO adds mean_logits and, with use_weighting, log_sum_sq_probs).
TRL_FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def prepare_for_trl(reft_model: Any, outputs: tuple[str, ...] = TRL_FUSED_OUTPUTS) -> Any:
    """Make a TRL trainer built on ``reft_model`` train its interventions; call it after building the trainer.

    For DPO pass ``ref_model=reft_model.model``: outside a ReftModel call the base model runs
    without interventions, which is the reference (no second copy of the weights). Returns
    ``reft_model``.
    """
    reft_model = unwrap_model(require_reft_model(reft_model, "reft_model", "prepare_for_trl"))
    try:
        from trl.trainer.utils import add_fused_lm_head  # optional dependency
    except ImportError as exc:
        raise MissingDependencyError(
            "prepare_for_trl needs TRL's fused LM head (trl >= 1.16); install it with pip install 'reftlib[trl]'"
        ) from exc
    reft_model.__dict__.pop("forward", None)  # TRL's patch of the ReftModel
    reft_model.model.__dict__.pop("forward", None)  # and of the base model, when it is the DPO ref_model
    add_fused_lm_head(reft_model.model, outputs=outputs)
    return reft_model
