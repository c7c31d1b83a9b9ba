"""LoFiT (Yin, Ye, Durrett, NeurIPS 2024): localized fine-tuning of a few attention heads.

The two-step recipe::

    from reftlib.lofit import select_heads, tune_offsets, merge_and_unload

    selection = select_heads(model, tokenizer, train_data, fraction=0.03, l1=1e-3, lr=1e-3)
    selection.plot("heads.png"); selection.save("heads.json")
    reft_model = tune_offsets(model, selection, train_data, tokenizer=tokenizer, lr=1e-2)
    reft_model.save_pretrained("lofit")                 # head lists live in the intervention configs
    plain_model = merge_and_unload(reft_model)           # optional: a plain transformers model

1. :func:`select_heads` learns a scale ``z_h ← (1 + A_h) ⊙ z_h`` for every head with an L1 penalty
   and ranks heads by ``‖A_h‖₂`` (the model is left clean);
2. :func:`tune_offsets` learns offsets ``z_h ← z_h + v_h`` on the top heads only, at every token.

``train_data`` is ``(prompt, answer)`` pairs (cross-entropy) or ``(prompt, chosen, rejected)``
triples (DPO with :class:`~reftlib.training.ReftDPOTrainer`, the reference being the model with
interventions off; the DPO names are re-exported here from :mod:`reftlib.training.dpo`).
Both steps run on reftlib's ``Trainer`` subclasses. :func:`run_lofit_task` runs a whole task
(TruthfulQA, CLUTRR, MQuAKE: selection, offsets, evaluation, saved files), as ``reftlib lofit TASK``
does. See ``docs/lofit.md``.
"""

from ..errors import MergeError, MissingDependencyError
from ..training.dpo import (
    AdapterDPOTrainer,
    ReftDPODataCollator,
    ReftDPOTrainer,
    dpo_loss,
    make_preference_data_module,
    make_preference_dataset,
    sequence_logps,
)
from .data import Objective, make_sft_dataset, normalize_train_data, resolve_objective
from .iti import (
    AlphaSearch,
    ItiProbes,
    apply_iti,
    fit_linear_probes,
    iti_config,
    iti_probe_heads,
    tune_alpha,
    tune_iti_alpha,
)
from .merge import merge_and_unload
from .offsets import tune_offsets
from .plot import plot_head_scores
from .repe import (
    READING_METHODS,
    ReadingVectors,
    apply_repe,
    repe_config,
    repe_reading_vectors,
    tune_repe_alpha,
)
from .selection import (
    HeadScaleDPOTrainer,
    HeadScaleTrainer,
    HeadSelection,
    L1PenaltyMixin,
    count_heads,
    lofit_config,
    select_heads,
)
from .task_data import (
    TASKS,
    TaskData,
    TaskSpec,
    check_task_data,
    evaluate_task,
    get_task_spec,
    load_task_data,
    mean_and_stderr,
    truthfulqa_dpo_pairs,
)
from .tasks import random_head_selection, resolve_heads_from, run_lofit_task

__all__ = [
    "READING_METHODS",
    "TASKS",
    "AdapterDPOTrainer",
    "AlphaSearch",
    "HeadScaleDPOTrainer",
    "HeadScaleTrainer",
    "HeadSelection",
    "ItiProbes",
    "L1PenaltyMixin",
    "MergeError",
    "MissingDependencyError",
    "Objective",
    "ReadingVectors",
    "ReftDPODataCollator",
    "ReftDPOTrainer",
    "TaskData",
    "TaskSpec",
    "apply_iti",
    "apply_repe",
    "check_task_data",
    "count_heads",
    "dpo_loss",
    "evaluate_task",
    "fit_linear_probes",
    "get_task_spec",
    "iti_config",
    "iti_probe_heads",
    "load_task_data",
    "lofit_config",
    "make_preference_data_module",
    "make_preference_dataset",
    "make_sft_dataset",
    "mean_and_stderr",
    "merge_and_unload",
    "normalize_train_data",
    "plot_head_scores",
    "random_head_selection",
    "repe_config",
    "repe_reading_vectors",
    "resolve_heads_from",
    "resolve_objective",
    "run_lofit_task",
    "select_heads",
    "sequence_logps",
    "truthfulqa_dpo_pairs",
    "tune_alpha",
    "tune_iti_alpha",
    "tune_offsets",
    "tune_repe_alpha",
]
