"""DPO under FSDP2: two CPU processes (gloo) train the same LoReFT as one process with reftlib's DPO loss.

One ``torchrun`` launch of ``tests/fsdp_dpo_train.py``; the single-process reference is computed
here on the same global batch of preference pairs. The reference policy of DPO is the sharded
model with its interventions switched off (``disable_interventions``), so its log-probabilities
must be the base model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from reftlib.training import sequence_logps

HERE = Path(__file__).parent
SCRIPT = HERE / "fsdp_dpo_train.py"
sys.path.insert(0, str(HERE))
import fsdp_dpo_train  # noqa: E402
import fsdp_train  # noqa: E402
from helpers import run_torchrun  # noqa: E402

EPS = torch.finfo(torch.float32).eps
VOCAB_SUM = 128  # the widest reduction of the DPO log-probs: the log-sum-exp over the tiny vocabulary

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.xdist_group("torchrun"),  # one multi-process job at a time (see helpers.run_torchrun)
]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Run the script under torchrun once; the output folder and the per-rank reports."""
    out = tmp_path_factory.mktemp("fsdp_dpo")
    return out, run_torchrun(SCRIPT, out)


@pytest.fixture(scope="module")
def single():
    """The single-process reference on the whole global batch: losses, log-probs and the trained tensors."""
    threads = torch.get_num_threads()
    try:
        return fsdp_dpo_train.run_single()
    finally:
        torch.set_num_threads(threads)


def _tolerance(losses: list[float], logps: list[float]) -> float:
    """Relative tolerance of the sharded run against one process, from the order of reductions.

    Each log-probability is reassociated (half of the batch per process, then FSDP2's average of
    the two gradients) in reductions of at most ``VOCAB_SUM`` terms: up to ``VOCAB_SUM·eps`` of
    its magnitude. The DPO margin ``β·((π_c - ref_c) - (π_r - ref_r))`` adds four of them, so the
    loss (and the sigmoid factor of every gradient) moves by up to ``4·β·max|log p|·VOCAB_SUM·eps``,
    which relative to the smallest loss is ``A = 4·β·max|log p| / min(loss)`` times the log-probs'
    own relative error. The difference enters each of ``STEPS`` updates once.
    """
    amplification = 1 + 4 * fsdp_dpo_train.BETA * max(abs(v) for v in logps) / min(losses)
    return fsdp_dpo_train.STEPS * VOCAB_SUM * EPS * amplification


def test_sharded_dpo_matches_one_process(fsdp_run, single):
    out, ranks = fsdp_run
    losses, policy, reference, expected = single
    tol = _tolerance(losses, policy + reference)
    assert tol < 1e-2  # the bound stays meaningful for these data (the loss is far from 0)
    for rank in ranks.values():
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(losses), rtol=tol, atol=0)
    assert losses[-1] < losses[0] - 0.2  # it trains: the chosen answers gain over the rejected ones
    trained = load_file(out / "final" / "reft_model.safetensors")
    assert trained.keys() == expected.keys()
    for key, value in expected.items():  # each tensor within tol of its own largest entry
        scale = value.abs().max().item()
        torch.testing.assert_close(trained[key], value, atol=tol * scale, rtol=0, msg=key)


def test_first_step_log_probs_match_one_process(fsdp_run, single):
    _out, ranks = fsdp_run
    _losses, policy, reference, _expected = single
    n = fsdp_dpo_train.PAIRS
    for r, rank in ranks.items():
        rows = fsdp_dpo_train.rank_rows(r, 2)
        # the rank's rows of the global [chosen; rejected] layout
        index = list(range(n))[rows] + [n + i for i in range(n)[rows]]
        for got, want in ((rank["policy_logps"], policy), (rank["reference_logps"], reference)):
            want = torch.tensor([want[i] for i in index])
            torch.testing.assert_close(torch.tensor(got), want, rtol=VOCAB_SUM * EPS, atol=0)


def test_reference_is_the_base_model(fsdp_run):
    """The interventions-off pass of the sharded model gives the unsharded base model's log-probs."""
    _out, ranks = fsdp_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = fsdp_train.base_model()
        for r, rank in ranks.items():
            batch = fsdp_dpo_train.dpo_batch(fsdp_dpo_train.rank_rows(r, 2))
            with torch.no_grad():
                logps = sequence_logps(base, {"input_ids": batch["input_ids"],
                                              "attention_mask": batch["attention_mask"]}, batch["labels"])
            # FSDP2 only moves the weights (all-gather): the same fp32 operations on the same rows.
            torch.testing.assert_close(torch.tensor(rank["reference_logps"]), logps, atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)
    # and the trained policy differs from it (the interventions act)
    assert ranks[0]["policy_logps"] != ranks[0]["reference_logps"]
