"""FSDP2: two CPU processes (gloo) with a sharded frozen base train the same interventions as one process.

One ``torchrun`` launch of ``tests/fsdp_train.py`` covers LoReFT and LoFiT head offsets, activation
checkpointing, the per-process memory, checkpoint + resume and the saved folder; the
single-process references are computed here. Bad input is checked without a process group.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import reftlib
from reftlib.distributed import check_trainer_fsdp, fsdp_layer_classes

HERE = Path(__file__).parent
SCRIPT = HERE / "fsdp_train.py"
sys.path.insert(0, str(HERE))
import fsdp_train  # noqa: E402
from helpers import assert_close_to_scale, run_torchrun  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

EPS = torch.finfo(torch.float32).eps
# FSDP2 and one process run the same fp32 operations except for the order of reductions: each process
# sums half of the batch and FSDP2 averages the two gradients. A sum of at most K = 64 terms (the
# widest reduction of the tiny model: its MLP) reassociated changes its result by up to K*eps
# relative to its terms' scale; the difference enters every step's update once, so after STEPS steps:
TOL = fsdp_train.STEPS * 64 * EPS

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.xdist_group("torchrun"),  # one multi-process job at a time (see helpers.run_torchrun)
]



@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Run the script under torchrun once; the output folder and the per-rank reports."""
    out = tmp_path_factory.mktemp("fsdp")
    return out, run_torchrun(SCRIPT, out)


@pytest.fixture(scope="module")
def single():
    """The single-process references: ``method -> (losses, adapter tensors)`` on the same global batch."""
    threads = torch.get_num_threads()
    try:
        return {method: fsdp_train.run_single(method) for method in fsdp_train.METHODS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", [*fsdp_train.METHODS, "loreft_checkpointed"])
def test_sharded_training_matches_one_process(fsdp_run, single, method):
    out, ranks = fsdp_run
    losses, expected = single["loreft" if method == "loreft_checkpointed" else method]
    for rank in ranks.values():
        torch.testing.assert_close(torch.tensor(rank["losses"][method]), torch.tensor(losses), rtol=TOL, atol=0)
    assert losses[-1] < losses[0]  # it trains
    trained = load_file(out / method / "final" / "reft_model.safetensors")
    assert_close_to_scale(trained, expected, TOL, method)


def test_each_process_holds_half_of_the_base(fsdp_run):
    _out, ranks = fsdp_run
    # FSDP2 shards every tensor on dim 0 into torch.chunk pieces: rank 0 gets ceil(n/2) rows.
    shapes = ranks[0]["held"]["base_shapes"]
    row = [torch.Size(s[1:]).numel() for s in shapes]
    first = sum(-(-s[0] // 2) * r for s, r in zip(shapes, row))
    total = sum(s[0] * r for s, r in zip(shapes, row))
    assert ranks[0]["held"]["base"] == {"local": first, "full": total}
    assert ranks[1]["held"]["base"] == {"local": total - first, "full": total}
    assert 0.45 < first / total < 0.55
    # The interventions live in the root unit: sharded at rest too (gathered whole for each forward).
    held = [ranks[r]["held"]["interventions"] for r in (0, 1)]
    assert held[0]["full"] == held[1]["full"] == held[0]["local"] + held[1]["local"] > 0


def test_resume_matches_an_uninterrupted_run(fsdp_run):
    out, ranks = fsdp_run
    at = fsdp_train.RESUME_AT
    for rank in ranks.values():
        torch.testing.assert_close(torch.tensor(rank["losses"]["loreft_resumed"]),
                                   torch.tensor(rank["losses"]["loreft"][at:]), rtol=TOL, atol=0)
    # The same operations in the same order; only the optimizer may pick another kernel for the
    # restored momentum (one rounding per update): a few ulps of each tensor's scale per step.
    assert_close_to_scale(load_file(out / "loreft_resumed" / "final" / "reft_model.safetensors"),
                           load_file(out / "loreft" / "final" / "reft_model.safetensors"),
                           8 * EPS * (fsdp_train.STEPS - at), "resumed")
    assert (out / "loreft_ckpt" / "reft_config.json").is_file()
    assert not any(p.suffix == ".safetensors" and p.name != "reft_model.safetensors"
                   for p in (out / "loreft_ckpt").iterdir())  # interventions only, no base weights


def test_saved_folder_loads_in_one_process(fsdp_run):
    out, ranks = fsdp_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = reftlib.ReftModel.from_pretrained(out / "loreft" / "final", fsdp_train.base_model())
        loaded.eval()
        ids = fsdp_train.probe()
        with torch.no_grad():
            logits = loaded(input_ids=ids, attention_mask=torch.ones_like(ids),
                            unit_locations=fsdp_train.positions("loreft")).logits
    finally:
        torch.set_num_threads(threads)
    # FSDP2 only moves the weights (all-gather): the forward computes the same fp32 operations.
    torch.testing.assert_close(logits, torch.tensor(ranks[0]["probe_logits"]), atol=0, rtol=0)
    assert ranks[0]["probe_logits"] == ranks[1]["probe_logits"]


def test_bad_input_under_fsdp(fsdp_run):
    _out, ranks = fsdp_run
    errors = ranks[0]["errors"]
    assert "already sharded" in errors["shard_twice"]
    assert "fsdp_config={'version': 2}" in errors["trainer_with_presharded_model"]


def test_shard_refuses_trainable_base_and_other_models():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), [
        {"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}])
    reft_model.model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(reftlib.ReftConfigError, match=r"1 base-model parameter.*down_proj.*Freeze the base"):
        reftlib.shard_reft_model(reft_model)
    with pytest.raises(reftlib.ReftConfigError, match="ReftModel"):
        reftlib.shard_reft_model(tiny_model("llama"))
    reft_model.model.requires_grad_(False)
    if not dist.is_initialized():
        with pytest.raises(reftlib.ReftConfigError, match="init_process_group"):
            reftlib.shard_reft_model(reft_model)
    assert fsdp_layer_classes(reft_model) == ["LlamaDecoderLayer"]


def test_trainer_refuses_fsdp1():
    with pytest.raises(reftlib.ReftConfigError, match=r"FSDP2 only.*'version': 2"):
        check_trainer_fsdp(SimpleNamespace(fsdp_version=1))
    check_trainer_fsdp(SimpleNamespace(fsdp_version=2))


def test_trainer_needs_full_state_dict_checkpoints():
    """accelerate's FSDP2 default (sharded state dicts) would skip reftlib's save: refused with the setting to use."""
    from torch.distributed.fsdp import StateDictType

    with pytest.raises(reftlib.ReftConfigError, match="FULL_STATE_DICT"):
        check_trainer_fsdp(SimpleNamespace(fsdp_version=2, state_dict_type=StateDictType.SHARDED_STATE_DICT))
    with pytest.raises(reftlib.ReftConfigError, match="FULL_STATE_DICT"):
        check_trainer_fsdp(SimpleNamespace(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"))
    check_trainer_fsdp(SimpleNamespace(fsdp_version=2, state_dict_type=StateDictType.FULL_STATE_DICT))
    check_trainer_fsdp(SimpleNamespace(fsdp_version=2, state_dict_type="FULL_STATE_DICT"))
