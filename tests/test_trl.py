"""TRL's ``SFTTrainer`` and ``DPOTrainer`` train a ReftModel's interventions (skipped when trl is not installed).

TRL (1.x) computes log-probabilities with a fused LM head: it replaces ``model.forward`` with a
function that runs ``model.base_model`` and the head itself. On a ReftModel that skips
``ReftModel.forward``, so no intervention acts and nothing trains (the first test pins this
down). :func:`prepare_for_trl` moves the fused head under the ReftModel, onto the Hugging
Face model inside it; then both trainers work, with positions configured on the representations
or given by reftlib's ``ReftDataCollator`` (``intervention_locations``). For DPO, pass the base
model inside the ReftModel as ``ref_model``: outside a ReftModel call it runs without
interventions, which is the reference (no second copy of the weights). See ``docs/distributed.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import reftlib
from reftlib.training import make_last_position_supervised_data_module, sequence_logps
from reftlib.training.trl_support import prepare_for_trl

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'reftlib[trl]')")
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

EPS = torch.finfo(torch.float32).eps
VOCAB_SUM = 128  # the tiny vocabulary: the widest reduction in a token's log-probability

PROMPTS = ["hi ", "yo ", "ab ", "it is "]
ANSWERS = ["there", "man", "cd", "fine"]
REJECTED = ["foo", "bar", "xy", "bad"]


def _reft_model(positions: str | None = "f3") -> reftlib.ReftModel:
    model = tiny_model("llama")
    torch.manual_seed(1)
    reps = [{"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}]
    if positions is not None:
        reps[0]["positions"] = positions
    return reftlib.get_reft_model(model, reps)


def _args(config_cls, tmp_path, **kwargs):
    return config_cls(output_dir=str(tmp_path), max_steps=6, learning_rate=2e-2, per_device_train_batch_size=4,
                      logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                      dataloader_num_workers=0, bf16=False, **kwargs)  # TRL defaults to bf16 autocast


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_only_interventions_trained(reft_model, base_before, reft_before) -> None:
    base_after = reft_model.model.state_dict()
    assert base_after.keys() == base_before.keys()
    for key, value in base_before.items():  # the frozen base: bit-identical
        assert torch.equal(base_after[key], value), key
    changed = [k for k, v in reft_before.items() if not torch.equal(reft_model.state_dict()[k], v)]
    assert changed and all(k.startswith("adapters.") for k in changed)
    assert {k for k in reft_before if k.startswith("adapters.")} == set(changed)  # every intervention tensor


def _sft_dataset():
    import datasets

    return datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": ANSWERS})


def test_trl_fused_head_alone_skips_the_interventions(tmp_path):
    """Without :func:`prepare_for_trl`, TRL's forward bypasses ReftModel.forward: no intervention gets a gradient."""
    reft_model = _reft_model()
    trainer = SFTTrainer(model=reft_model, args=_args(SFTConfig, tmp_path), train_dataset=_sft_dataset(),
                         processing_class=tiny_tokenizer())
    assert "forward" in reft_model.__dict__  # TRL patched the instance
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert not reft_model(**batch, fused_lm_head=True).loss.requires_grad  # only frozen weights were used
    prepare_for_trl(reft_model)
    reft_model(**batch, fused_lm_head=True).loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in reft_model.adapters.parameters())


def test_sft_configured_positions(tmp_path):
    """Positions configured on the representation ("f3"): TRL's own tokenization and collator, unchanged."""
    reft_model = _reft_model("f3")
    base_before, reft_before = _snapshot(reft_model.model), _snapshot(reft_model)
    trainer = SFTTrainer(model=reft_model, args=_args(SFTConfig, tmp_path), train_dataset=_sft_dataset(),
                         processing_class=tiny_tokenizer())
    prepare_for_trl(reft_model)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0]
    _assert_only_interventions_trained(reft_model, base_before, reft_before)


def test_sft_with_reftlib_collator(tmp_path):
    """reftlib's data module: intervention at the last prompt token through ``intervention_locations``."""
    tokenizer = tiny_tokenizer()
    reft_model = _reft_model(None)
    module = make_last_position_supervised_data_module(tokenizer, reft_model, PROMPTS, ANSWERS)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(len(PROMPTS))])
    assert "intervention_locations" in batch
    with torch.no_grad():
        expected_first = reft_model(**batch).loss.item()  # reftlib's own loss with those positions
    base_before, reft_before = _snapshot(reft_model.model), _snapshot(reft_model)
    # TRL keeps only its own columns unless told otherwise: intervention_locations must reach the model.
    args = _args(SFTConfig, tmp_path, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    trainer = SFTTrainer(model=reft_model, args=args,
                         train_dataset=module["train_dataset"], data_collator=module["data_collator"],
                         processing_class=tokenizer)
    prepare_for_trl(reft_model)
    trainer.train()
    losses = _losses(trainer)
    # The first step's loss is the mean token loss at the collator's positions, computed by TRL's
    # chunked log-softmax instead of cross_entropy: each log-probability within VOCAB_SUM·eps.
    assert losses[0] == pytest.approx(expected_first, rel=VOCAB_SUM * EPS)
    assert losses[-1] < losses[0]
    _assert_only_interventions_trained(reft_model, base_before, reft_before)


def test_dpo_with_the_base_model_as_reference(tmp_path):
    """DPO: ``ref_model=reft_model.model`` is the interventions-off reference; only the interventions train."""
    import datasets

    tokenizer = tiny_tokenizer()
    reft_model = _reft_model("f3")
    base_before, reft_before = _snapshot(reft_model.model), _snapshot(reft_model)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": ANSWERS, "rejected": REJECTED})
    trainer = DPOTrainer(model=reft_model, ref_model=reft_model.model, args=_args(DPOConfig, tmp_path, beta=0.5),
                         train_dataset=dataset, processing_class=tokenizer)
    assert trainer.ref_model is reft_model.model  # no second copy of the weights
    prepare_for_trl(reft_model)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0]
    _assert_only_interventions_trained(reft_model, base_before, reft_before)

    # The reference log-probs, after training, are those of a fresh copy of the base model.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PROMPTS))])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base = sequence_logps(tiny_model("llama"), inputs, labels)
        policy = sequence_logps(reft_model, inputs, labels)
    reference = torch.cat([ref_chosen, ref_rejected])
    # Two kernels (TRL's chunked log-softmax, cross_entropy) over the same fp32 logits: each token's
    # log-probability within VOCAB_SUM·eps of its magnitude; a row sums a handful of them.
    torch.testing.assert_close(reference, base, rtol=VOCAB_SUM * EPS, atol=0)
    assert not torch.allclose(policy, base)  # the trained interventions act on the policy
