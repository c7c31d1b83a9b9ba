"""Evaluation for LoFiT-style benchmarks: TruthfulQA (multiple choice), CLUTRR and MQuAKE (exact match).

Data loaders and prompt formats live in :mod:`reftlib.evaluation.data`, scoring in
:mod:`reftlib.evaluation.metrics`. The data is read from a shared folder, never bundled; see
:func:`find_data_dir`.

Example::

    from reftlib.evaluation import load_truthfulqa, truthfulqa_mc
    scores = truthfulqa_mc(model, tokenizer, load_truthfulqa("test"))  # {"mc1": ..., "mc2": ..., "n": 409}

With a :class:`reftlib.ReftModel`, position-restricted interventions (``"l1"``, ``"f3+l3"``, explicit
``unit_locations``) act on each example's *prompt*, also when ``prompt + answer`` is scored;
interventions on every position act on every token (see :mod:`reftlib.evaluation.metrics`).
"""

from .data import (
    CLUTRR_TEMPLATE,
    DATA_ENV_VAR,
    MQUAKE_TEMPLATE,
    SPLITS,
    TRUTHFULQA_TEMPLATE,
    ClutrrExample,
    MquakeExample,
    Rewrite,
    TruthfulQAExample,
    clutrr_prompt,
    clutrr_sft_examples,
    find_data_dir,
    load_clutrr,
    load_mquake,
    load_truthfulqa,
    mquake_prompt,
    mquake_sft_examples,
    truthfulqa_preference_pairs,
    truthfulqa_prompt,
    truthfulqa_sft_examples,
)
from .metrics import PromptLocations, answer_logprobs, exact_match_generate, truthfulqa_mc

__all__ = [
    "CLUTRR_TEMPLATE",
    "DATA_ENV_VAR",
    "MQUAKE_TEMPLATE",
    "SPLITS",
    "TRUTHFULQA_TEMPLATE",
    "ClutrrExample",
    "MquakeExample",
    "PromptLocations",
    "Rewrite",
    "TruthfulQAExample",
    "answer_logprobs",
    "clutrr_prompt",
    "clutrr_sft_examples",
    "exact_match_generate",
    "find_data_dir",
    "load_clutrr",
    "load_mquake",
    "load_truthfulqa",
    "mquake_prompt",
    "mquake_sft_examples",
    "truthfulqa_mc",
    "truthfulqa_preference_pairs",
    "truthfulqa_prompt",
    "truthfulqa_sft_examples",
]
