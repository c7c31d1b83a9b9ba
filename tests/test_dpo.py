"""DPO for interventions (reftlib.training.dpo): data, collator, log-probabilities, loss, reference, training."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import char_ids, tiny_tokenizer
from transformers import TrainingArguments

import reftlib
from reftlib.errors import InputError, ReftConfigError
from reftlib.lofit import lofit_config
from reftlib.training import (
    AdapterDPOTrainer,
    ReftDPODataCollator,
    ReftDPOTrainer,
    dpo_loss,
    make_preference_data_module,
    make_preference_dataset,
    sequence_logps,
)

TRIPLES = [("Q: sky?\nA:", " blue", " green"), ("Q: snow?\nA:", " white", " black"),
           ("Q: grass?\nA:", " green", " pink"), ("Q: sun?\nA:", " hot", " cold"),
           ("Q: ice?\nA:", " cold", " warm"), ("Q: fire?\nA:", " hot", " wet"),
           ("Q: sea?\nA:", " salty", " sweet"), ("Q: night?\nA:", " dark", " bright")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama")


def base_lm(family="llama", seed=0):
    """A tiny model whose LM head is large enough for confident predictions."""
    model = tiny_model(family, seed=seed)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
    return model


def loreft_model(seed=0):
    torch.manual_seed(seed)
    return reftlib.get_reft_model(base_lm(), reftlib.ReftConfig([
        {"layer": 1, "component": "block_output", "positions": "l1",
         "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)}]))


def args(tmp_path, **kwargs):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  learning_rate=2e-2, max_steps=20, report_to=[], use_cpu=True, disable_tqdm=True,
                  save_strategy="no", logging_steps=1, lr_scheduler_type="constant", seed=0)
    values.update(kwargs)
    return TrainingArguments(**values)


# --------------------------------------------------------------------------- data
def test_dataset_and_collator_layout(tok):
    dataset = make_preference_dataset(tok, TRIPLES[:2], positions="l1", max_length=64)
    first = dataset[0]
    prompt = [1, *char_ids("Q: sky?\nA:")]
    assert first["chosen_input_ids"] == prompt + char_ids(" blue")  # no EOS by default (MC-style scoring)
    assert first["chosen_labels"] == [-100] * len(prompt) + char_ids(" blue")
    assert first["rejected_input_ids"] == prompt + char_ids(" green")
    assert first["intervention_locations"] == [[len(prompt) - 1]]  # the last prompt token

    batch = ReftDPODataCollator(tokenizer=tok)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 4
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; right padding, mask from lengths
    assert batch["input_ids"][0, :len(first["chosen_input_ids"])].tolist() == first["chosen_input_ids"]
    assert batch["input_ids"][2, :len(first["rejected_input_ids"])].tolist() == first["rejected_input_ids"]
    assert batch["attention_mask"][0].sum() == len(first["chosen_input_ids"])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["intervention_locations"].shape == (4, 1, 1)
    assert torch.equal(batch["intervention_locations"][:2], batch["intervention_locations"][2:])

    everywhere = make_preference_dataset(tok, TRIPLES[:2], max_length=64)
    assert "intervention_locations" not in everywhere.column_names  # LoFiT: every position
    assert "intervention_locations" not in ReftDPODataCollator(tokenizer=tok)([everywhere[0]])

    with_eos = make_preference_dataset(tok, TRIPLES[:1], nonstop=False, max_length=64)[0]
    assert with_eos["chosen_input_ids"][-1] == tok.eos_token_id


def test_collator_left_padding_and_reference_column(tok):
    dataset = make_preference_dataset(tok, TRIPLES[:2], positions="l1", max_length=64)
    dataset = dataset.add_column("reference_chosen_logps", [-1.0, -2.0])
    dataset = dataset.add_column("reference_rejected_logps", [-3.0, -4.0])
    batch = ReftDPODataCollator(tokenizer=tok, padding_side="left")([dataset[0], dataset[1]])
    assert batch["reference_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][:, -1].all()
    pads = width - batch["attention_mask"].sum(dim=1)
    prompt_len = len([1, *char_ids("Q: sky?\nA:")])
    assert int(batch["intervention_locations"][0, 0, 0]) == int(pads[0]) + prompt_len - 1


def test_bad_data_is_reported(tok):
    with pytest.raises(InputError, match="triple"):
        make_preference_dataset(tok, [("a", "b")], max_length=16)
    with pytest.raises(InputError, match="no preference"):
        make_preference_dataset(tok, [], max_length=16)
    with pytest.raises(InputError, match="columns"):
        ReftDPODataCollator(tokenizer=tok)([{"input_ids": [1, 2]}])
    with pytest.raises(InputError, match="pad token"):
        ReftDPODataCollator(tokenizer=tiny_tokenizer(pad=False))


# --------------------------------------------------------------------------- log-probabilities and loss
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_matches_a_full_softmax(tok, side):
    model = base_lm()
    dataset = make_preference_dataset(tok, TRIPLES[:3], max_length=64)
    batch = ReftDPODataCollator(tokenizer=tok, padding_side=side)([dataset[i] for i in range(3)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        expected = []
        for row in range(labels.shape[0]):
            total = 0.0
            for t in range(1, labels.shape[1]):
                if labels[row, t] != -100:
                    total += float(logprobs[row, t - 1, labels[row, t]])
            expected.append(total)
        fast = sequence_logps(model, inputs, labels)  # logits_to_keep
        full = sequence_logps(model, inputs, labels, logits_to_keep=False)
    # fp32 sums of <= 64 same-sign log-probs: each term and partial sum rounds at 2**-24 relative, so two
    # summation orders differ by <= 64 * 2**-24 ≈ 4e-6 of the total (an absolute bound breaks on other CPUs)
    torch.testing.assert_close(fast, torch.tensor(expected), rtol=1e-5, atol=0)
    torch.testing.assert_close(full, fast, rtol=1e-5, atol=0)


def test_dpo_loss_formula():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = 0.5 * ((pc - rc) - (pr - rr))
    assert math.isclose(float(loss), float(-torch.nn.functional.logsigmoid(margins).mean()), rel_tol=1e-6)
    assert math.isclose(float(stats["rewards/margins"]), float(margins.mean()), rel_tol=1e-6)
    assert float(stats["rewards/accuracies"]) == 0.5  # margins 0.75 and -0.5
    same, _ = dpo_loss(pc, pr, pc, pr)  # policy == reference
    assert math.isclose(float(same), math.log(2), rel_tol=1e-6)
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expected = -(0.8 * torch.nn.functional.logsigmoid(margins) + 0.2 * torch.nn.functional.logsigmoid(-margins))
    assert math.isclose(float(smooth), float(expected.mean()), rel_tol=1e-6)


def test_reference_is_the_model_with_interventions_off(tmp_path, tok):
    reft_model = loreft_model()
    module = make_preference_data_module(tok, reft_model, TRIPLES[:4], positions="l1", max_length=64)
    trainer = ReftDPOTrainer(model=reft_model, args=args(tmp_path), tokenizer=tok, beta=0.1, **module)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        loss = trainer.compute_loss(reft_model, dict(batch))
        policy = sequence_logps(reft_model, {**inputs, "intervention_locations": batch["intervention_locations"]},
                                batch["labels"])
        base = sequence_logps(reft_model.model, inputs, batch["labels"])  # the plain model: the reference
    expected, _ = dpo_loss(policy[:4], policy[4:], base[:4], base[4:], beta=0.1)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(policy, base)  # the intervention changes the answers' log-probabilities

    # precomputed reference columns hold the same values, and give the same loss
    pre = ReftDPOTrainer(model=reft_model, args=args(tmp_path), tokenizer=tok, precompute_reference=True, **module)
    columns = pre.train_dataset
    assert torch.allclose(torch.tensor(columns["reference_chosen_logps"]), base[:4], atol=1e-5)
    assert torch.allclose(torch.tensor(columns["reference_rejected_logps"]), base[4:], atol=1e-5)
    pre_batch = pre.data_collator([columns[i] for i in range(4)])
    with torch.no_grad():
        # |d(-logsigmoid(m))/dm| <= 1 and m = beta * (Δchosen - Δrejected): the loss moves by at most
        # beta * 2 * (largest difference between the stored and recomputed reference log-probs)
        drift = max(float((torch.tensor(columns[f"reference_{side}_logps"]) - base[i:i + 4]).abs().max())
                    for side, i in (("chosen", 0), ("rejected", 4)))
        torch.testing.assert_close(pre.compute_loss(reft_model, dict(pre_batch)), expected, rtol=0,
                                   atol=1e-6 + 0.1 * 2 * drift)

    def no_reference_pass():
        raise AssertionError("the reference was recomputed although it was precomputed")

    pre.reference_mode = no_reference_pass  # the columns must reach compute_loss through the dataloader
    pre.args.max_steps = 2
    pre.train()


@pytest.mark.parametrize("kind", ["loreft_prompt_tokens", "lofit_all_positions"])
def test_dpo_training_lowers_loss_and_grows_margin(tmp_path, tok, kind):
    if kind == "loreft_prompt_tokens":
        torch.manual_seed(0)
        positions = "f2+l2"
        reft_model = reftlib.get_reft_model(base_lm(), reftlib.ReftConfig([
            {"layer": 0, "component": "block_output", "positions": positions,
             "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)}]))
    else:
        torch.manual_seed(0)
        reft_model = reftlib.get_reft_model(base_lm(), lofit_config([(1, 0), (1, 2), (2, 3), (2, 1)]))
        positions = None
    module = make_preference_data_module(tok, reft_model, TRIPLES, positions=positions, max_length=64)
    trainer = ReftDPOTrainer(model=reft_model, args=args(tmp_path), tokenizer=tok, train_dataset=module["train_dataset"],
                             eval_dataset=module["train_dataset"])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.1
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.2
    assert after["eval_rewards/accuracies"] >= 0.75
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 20 and "rewards/margins" in logs[0]
    assert sum(e["loss"] for e in logs[-5:]) < sum(e["loss"] for e in logs[:5])
    assert sum(e["rewards/margins"] for e in logs[-5:]) > sum(e["rewards/margins"] for e in logs[:5])
    base = {k: v for k, v in reft_model.model.state_dict().items()}
    assert all(torch.equal(base[k], v) for k, v in base_lm().state_dict().items())  # base model untouched


def test_gradient_accumulation_gives_the_same_update(tmp_path, tok):
    def one_step(**kwargs):
        reft_model = loreft_model(seed=3)
        module = make_preference_data_module(tok, reft_model, TRIPLES[:4], positions="l1", max_length=64)
        trainer = ReftDPOTrainer(model=reft_model, tokenizer=tok, args=args(tmp_path, max_steps=1, optim="sgd",
                                                                            learning_rate=1.0, **kwargs), **module)
        trainer.train()
        return {k: v.clone() for k, v in reft_model.adapters.state_dict().items()}

    full = one_step(per_device_train_batch_size=4)
    accumulated = one_step(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], rtol=1e-4, atol=1e-6)


def test_lora_with_the_same_objective(tmp_path, tok):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(base_lm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    module = make_preference_data_module(tok, model, TRIPLES, max_length=64)
    trainer = AdapterDPOTrainer(model=model, args=args(tmp_path, max_steps=10), tokenizer=tok,
                                precompute_reference=True, train_dataset=module["train_dataset"],
                                eval_dataset=module["train_dataset"])
    with model.disable_adapter(), torch.no_grad():
        batch = trainer.data_collator([module["train_dataset"][i] for i in range(2)])
        base = sequence_logps(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                              batch["labels"])
    # fp32 sums of log-probs computed in different batches: relative bound (<= 64 terms * 2**-24 ≈ 4e-6)
    assert math.isclose(trainer.train_dataset[0]["reference_chosen_logps"], float(base[0]), rel_tol=1e-5)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_trainer_argument_errors(tmp_path, tok):
    with pytest.raises(ReftConfigError, match="beta"):
        ReftDPOTrainer(model=loreft_model(), args=args(tmp_path), tokenizer=tok, beta=0.0)
    with pytest.raises(ReftConfigError, match="disable_adapter"):
        AdapterDPOTrainer(model=base_lm(), args=args(tmp_path), tokenizer=tok)
    reft_model = loreft_model()
    trainer = ReftDPOTrainer(model=reft_model, args=args(tmp_path), tokenizer=tok)
    assert isinstance(trainer.data_collator, ReftDPODataCollator)
    with pytest.raises(InputError, match="even"):
        trainer.compute_loss(reft_model, {"input_ids": torch.ones(3, 4, dtype=torch.long),
                                          "labels": torch.ones(3, 4, dtype=torch.long)})
