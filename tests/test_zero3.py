"""DeepSpeed ZeRO-3: two CPU processes (gloo) with every parameter partitioned train what one process trains.

One ``torchrun`` launch of ``tests/zero3_train.py`` (``deepspeed.initialize`` with ZeRO stage 3,
``reftlib.distributed.after_deepspeed_step`` after each step) covers LoReFT and LoFiT head offsets,
the per-process memory, checkpoint + resume and the saved folder; the single-process references
are ``fsdp_train.run_single`` (the same model, batch and optimizer). Skipped where DeepSpeed is not
installed: ``make test-deepspeed`` runs it in its own environment. The Trainer's ``deepspeed=`` path runs on GPUs only (``test_devices.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import reftlib

pytest.importorskip("deepspeed")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fsdp_train  # noqa: E402
from helpers import assert_close_to_scale, run_torchrun  # noqa: E402

EPS = torch.finfo(torch.float32).eps
# As for FSDP2 (test_fsdp.py): the same fp32 operations but for the order of reductions (each process
# sums half of the batch, DeepSpeed averages the two gradients); sums of at most 64 terms (the tiny
# model's widest), each step's update once, and the rotation's retraction (a QR of the same matrix
# up to that difference):
TOL = fsdp_train.STEPS * 64 * EPS

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.xdist_group("torchrun"),  # one multi-process job at a time (see helpers.run_torchrun)
]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return out, run_torchrun(HERE / "zero3_train.py", out)


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    try:
        return {method: fsdp_train.run_single(method) for method in fsdp_train.METHODS}
    finally:
        torch.set_num_threads(threads)



@pytest.mark.parametrize("method", fsdp_train.METHODS)
def test_zero3_training_matches_one_process(zero3_run, single, method):
    out, ranks = zero3_run
    losses, expected = single[method]
    for rank in ranks.values():
        torch.testing.assert_close(torch.tensor(rank["losses"][method]), torch.tensor(losses), rtol=TOL, atol=0)
    assert losses[-1] < losses[0]
    trained = load_file(out / method / "final" / "reft_model.safetensors")
    assert_close_to_scale(trained, expected, TOL, method)


def test_rotations_are_retracted_after_each_zero3_step(zero3_run):
    """ZeRO's optimizer steps DeepSpeed's fp32 copies, not the model's parameters: without
    ``after_deepspeed_step`` the rotation's columns would drift from length 1/2 and orthogonality."""
    out, _ranks = zero3_run
    trained = load_file(out / "loreft" / "final" / "reft_model.safetensors")
    raws = [tensor.double() for key, tensor in trained.items() if key.endswith("rotate_layer.raw")]
    assert len(raws) == 2
    for raw in raws:
        gram = raw.T @ raw
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64) * 0.25,
                                   atol=16 * EPS, rtol=0)


def test_each_process_holds_half_of_the_base(zero3_run):
    _out, ranks = zero3_run
    for part in ("base", "interventions"):
        held = [ranks[r]["held"][part] for r in (0, 1)]
        assert held[0]["full"] == held[1]["full"] > 0
        # ZeRO-3 pads each parameter to a multiple of the process count and gives each process one piece.
        assert held[0]["local"] == held[1]["local"]
        assert 0.5 <= held[0]["local"] / held[0]["full"] < 0.5 + 2 / held[0]["full"] * 64


def test_resume_matches_an_uninterrupted_run(zero3_run):
    out, ranks = zero3_run
    at = fsdp_train.RESUME_AT
    for rank in ranks.values():
        torch.testing.assert_close(torch.tensor(rank["losses"]["loreft_resumed"]),
                                   torch.tensor(rank["losses"]["loreft"][at:]), rtol=TOL, atol=0)
    assert_close_to_scale(load_file(out / "loreft_resumed" / "final" / "reft_model.safetensors"),
                           load_file(out / "loreft" / "final" / "reft_model.safetensors"), TOL, "resumed")


def test_saved_folder_loads_in_one_process(zero3_run, single):
    out, _ranks = zero3_run
    loaded = reftlib.ReftModel.from_pretrained(out / "lofit" / "final", fsdp_train.base_model())
    assert_close_to_scale(reftlib.get_adapter_state_dict(loaded), single["lofit"][1], TOL, "loaded")


def test_reft_trainer_under_zero3_matches_the_plain_trainer(tmp_path):
    """``ReftTrainerForCausalLM`` with ``TrainingArguments(deepspeed=<ZeRO-3 config>)``: the post-step
    updates reach DeepSpeed's optimizer copies, ``save_model`` writes the gathered interventions, and
    the prefix cache turns itself off. (One process: see ``zero3_trainer.py``.)"""
    import zero3_trainer

    ranks = run_torchrun(HERE / "zero3_trainer.py", tmp_path / "zero3", nproc=1)
    threads = torch.get_num_threads()
    try:
        losses, expected = zero3_trainer.run_plain(tmp_path / "plain")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=TOL, atol=0)
    assert ranks[0]["prefix_cache"] is False
    trained = load_file(tmp_path / "zero3" / "final" / "reft_model.safetensors")
    assert_close_to_scale(trained, expected, TOL, "trainer")


def test_prefix_cache_under_zero3(tmp_path):
    """Skipping the cached lower layers on some processes only would desynchronize ZeRO-3's
    all-gathers: "auto" turns the cache off, ``prefix_cache=True`` is refused. (A second DeepSpeed
    Trainer cannot be built in the process of the first, so the stage is given here directly.)"""
    from transformers import TrainingArguments

    from reftlib.training import ReftTrainerForCausalLM

    class UnderZero3(ReftTrainerForCausalLM):
        def _deepspeed_zero_stage(self) -> int:
            return 3

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    model = fsdp_train.build("loreft")
    assert UnderZero3(model=model, args=args, train_dataset=[]).prefix_cache is None
    assert ReftTrainerForCausalLM(model=model, args=args, train_dataset=[]).prefix_cache is not None
    with pytest.raises(reftlib.ReftConfigError, match=r"DeepSpeed ZeRO-3 is on.*prefix_cache='auto' or False"):
        UnderZero3(model=model, args=args, train_dataset=[], prefix_cache=True)


def test_a_model_partitioned_at_load_is_refused_clearly():
    """transformers loads a model partitioned (``zero.Init``) while a ZeRO-3 config is alive; reftlib's
    one probing forward cannot run on it, and says what to do instead of failing inside the model."""
    model = fsdp_train.base_model()
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.data = torch.empty(0)  # what ZeRO-3 leaves in place of a partitioned parameter
    weight.ds_id = 0
    with pytest.raises(reftlib.ReftConfigError, match=r"partitioned by DeepSpeed ZeRO-3.*before the DeepSpeed config"):
        reftlib.get_reft_model(model, {"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)})
