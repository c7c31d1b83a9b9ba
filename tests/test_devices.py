"""reftlib on every available device: forward, generation, training, bf16 and persistence.

Each test runs once per device in ``REFTLIB_TEST_DEVICES`` (comma-separated; default: ``cpu``, plus
``cuda`` when a GPU is visible). On the CPU the comparisons with a CPU reference are trivial; on a GPU they
check the device paths the other suites never take (they run on the CPU; the Trainer tests pin
``use_cpu=True``): positions
copied from pinned host memory without blocking, the Trainer placing the model itself, CUDA
bf16 kernels, checkpoints written from GPU tensors. On a GPU machine: ``pytest tests/test_devices.py``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import randomize
from test_generation import GEN, PROMPTS
from test_generation import _left_pad as _left_pad_cpu
from test_prefix_cache import reft_at, train, without_dropout
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

import reftlib


def _devices() -> list[str]:
    listed = os.environ.get("REFTLIB_TEST_DEVICES")
    if listed:
        return [name.strip() for name in listed.split(",") if name.strip()]
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    chosen = torch.device(request.param)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("REFTLIB_TEST_DEVICES asks for cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    return chosen


def _left_pad(prompts, device):
    return tuple(tensor.to(device) for tensor in _left_pad_cpu(prompts))


def _reft(seed: int = 0) -> reftlib.ReftModel:
    reft_model = reftlib.get_reft_model(tiny_model("llama", seed=seed),
                                        {"layer": 1, "component": "block_output", "low_rank_dimension": 2})
    randomize(reft_model, scale=1.0)
    return reft_model.eval()


def test_forward_on_device_matches_cpu_and_edits_only_the_positions(device):
    cpu_model = _reft()
    ids, mask = _left_pad(PROMPTS, "cpu")
    with torch.no_grad():
        reference = cpu_model(input_ids=ids, attention_mask=mask, unit_locations="l1").logits
    reft_model = copy.deepcopy(cpu_model).set_device(device)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        out = reft_model(input_ids=ids, attention_mask=mask, unit_locations="l1").logits
        with reft_model.disable_interventions():
            base = reft_model.model(input_ids=ids, attention_mask=mask).logits
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), reference, atol=1e-4, rtol=1e-4)
    # Padding positions are ignored: a fully masked query row may be let to attend everywhere.
    changed = ((out - base).abs().amax(-1) > 1e-4).cpu() & mask.cpu().bool()
    assert [row.nonzero().flatten().tolist() for row in changed] == [[ids.shape[1] - 1]] * len(PROMPTS)


@pytest.mark.parametrize("mode", ["prompt", "prompt+generated"])
def test_batched_generation_on_device_equals_one_by_one(device, mode):
    reft_model = _reft().set_device(device)
    singles = [
        reft_model.generate(input_ids=torch.tensor([p], device=device), unit_locations="l1", mode=mode,
                            **GEN)[0, len(p):].tolist()
        for p in PROMPTS
    ]
    ids, mask = _left_pad(PROMPTS, device)
    batched = reft_model.generate(input_ids=ids, attention_mask=mask, unit_locations="l1", mode=mode, **GEN)
    assert batched.device.type == device.type
    assert batched[:, ids.shape[1]:].tolist() == singles


def test_training_on_device_learns_and_prefix_cache_changes_nothing(device, tmp_path):
    """The Trainer places the model itself (``use_cpu`` off for accelerators); cached == uncached there too."""
    tok = tiny_tokenizer("llama")
    runs = {}
    for cache in (False, "auto"):
        reft_model = reft_at(without_dropout(tiny_model("llama")), (1, "block_output"))
        trainer, losses, state = train(tok, reft_model, tmp_path, cache, steps=9, use_cpu=device.type == "cpu")
        assert all(p.device.type == device.type for p in reft_model.adapters.parameters())
        runs[cache] = trainer, losses, {k: v.cpu() for k, v in state.items()}
    trainer, losses, state = runs["auto"]
    assert trainer.prefix_cache.hits >= 5, trainer.prefix_cache
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs[False][1]), atol=1e-4, rtol=1e-4)
    for key, value in state.items():
        torch.testing.assert_close(value, runs[False][2][key], atol=1e-4, rtol=1e-4)


def test_bf16_model_with_fp32_interventions_on_device(device):
    """A bf16 base model keeps fp32 interventions; the loss and LoReFT's gradients are finite and non-zero."""
    model = tiny_model("llama", dtype=torch.bfloat16).to(device)
    reft_model = reftlib.get_reft_model(model, {"layer": 1, "component": "block_output", "low_rank_dimension": 2})
    iv = reft_model.interventions["layer_1_block_output"]
    assert iv.learned_source.weight.dtype == torch.float32 and iv.learned_source.weight.device.type == device.type
    ids, mask = _left_pad(PROMPTS, device)
    out = reft_model(input_ids=ids, attention_mask=mask, unit_locations="f2", labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    grad = iv.rotate_layer.raw.grad
    assert grad.device.type == device.type and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_saved_on_device_loads_anywhere_with_identical_outputs(device, tmp_path):
    reft_model = _reft().set_device(device)
    ids, mask = _left_pad(PROMPTS, device)
    with torch.no_grad():
        expected = reft_model(input_ids=ids, attention_mask=mask, unit_locations="l1").logits
    reft_model.save_pretrained(tmp_path / "saved")
    for target in ("cpu", device.type):
        loaded = reftlib.ReftModel.from_pretrained(tmp_path / "saved", tiny_model("llama")).set_device(target).eval()
        with torch.no_grad():
            out = loaded(input_ids=ids.to(target), attention_mask=mask.to(target), unit_locations="l1").logits
        tolerance = 0 if target == device.type else 1e-4
        torch.testing.assert_close(out.to(device), expected, atol=tolerance, rtol=tolerance)
