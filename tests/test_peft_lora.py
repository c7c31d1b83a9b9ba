"""ReFT + LoRA: reftlib interventions on a ``peft.PeftModel`` (and LoRA on a model under reftlib).

Structure discovery through the PEFT wrapper, joint training (plain optimizer and the reftlib
trainer), saving both adapters and reloading them onto a fresh base model with identical outputs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import reftlib
from reftlib import ReftModel
from reftlib.components import resolve_site
from reftlib.errors import CheckpointError, ReftConfigError
from reftlib.peft_utils import find_peft_model, load_reft_and_lora, save_reft_and_lora

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 12], [8, 1, 99, 23, 64, 30, 2]])
MASK = torch.ones_like(IDS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_model(task_type: str | None = None, targets=("q_proj", "v_proj"), seed: int = 0):
    kwargs = {"task_type": task_type} if task_type else {}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **kwargs)
    return peft.get_peft_model(tiny_model("llama", seed=seed), config)


def reft_config(query: bool = True) -> reftlib.ReftConfig:
    reps = [{"layer": 1, "component": "block_output", "low_rank_dimension": 4, "positions": "f2+l2"},
            {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1, 3])}]
    if query:  # a site on a projection that LoRA wraps
        reps.append({"layer": 0, "component": "query_output", "low_rank_dimension": 2, "positions": "f2+l2"})
    return reftlib.ReftConfig(representations=reps)


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def train(reft_model: ReftModel, steps: int = 6) -> list[float]:
    params = [p for p in reft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    reft_model.train()
    losses = []
    for _ in range(steps):
        loss = reft_model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    reft_model.eval()
    return losses


def logits(reft_model: ReftModel) -> torch.Tensor:
    with torch.no_grad():
        return reft_model(input_ids=IDS, attention_mask=MASK).logits


# --------------------------------------------------------------------------- structure
def test_sites_resolve_through_the_peft_wrapper():
    model = lora_model(targets=("q_proj", "v_proj", "o_proj"))
    lora_linear = peft.tuners.lora.Linear
    block = resolve_site(model, 1, "block_output")
    assert (block.path, block.kind) == ("base_model.model.model.layers.1", "output")
    query = resolve_site(model, 1, "query_output")
    assert query.path.endswith("self_attn.q_proj") and isinstance(query.module, lora_linear)  # LoRA included
    head = resolve_site(model, 1, "head_output")
    assert head.path.endswith("self_attn.o_proj") and isinstance(head.module, lora_linear) and head.num_heads == 4
    key = resolve_site(model, 1, "key_output")  # not wrapped by LoRA
    assert isinstance(key.module, torch.nn.Linear) and key.path.endswith("k_proj")
    assert reftlib.describe_structure(model)["mlp_output"] == "base_model.model.model.layers.0.mlp (output)"


def test_lora_stays_trainable_and_the_base_frozen():
    model = lora_model()
    reft_model = reftlib.get_reft_model(model, reft_config(), disable_model_grads=False)
    assert find_peft_model(reft_model) is model
    assert all(p.requires_grad for p in lora_params(model).values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in reft_model.adapters.parameters())
    frozen = reftlib.get_reft_model(lora_model(), reft_config())  # the default freezes LoRA too
    assert not any(p.requires_grad for p in lora_params(frozen.model).values())


# --------------------------------------------------------------------------- train, save, reload
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_train_save_reload_identical(tmp_path, task_type):
    model = lora_model(task_type)
    reft_model = reftlib.get_reft_model(model, reft_config(), disable_model_grads=False)
    lora_before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    reft_before = {n: p.detach().clone() for n, p in reft_model.adapters.state_dict().items()}
    losses = train(reft_model)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, lora_before[n]) for n, p in lora_params(model).items())
    assert all(not torch.equal(v, reft_before[k]) for k, v in reft_model.adapters.state_dict().items())
    want = logits(reft_model)

    # the plain recipe: each library saves and loads its own files
    model.save_pretrained(str(tmp_path / "lora"))
    reft_model.save_pretrained(tmp_path / "reft")
    reloaded_peft = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "lora"))
    reloaded = ReftModel.from_pretrained(tmp_path / "reft", reloaded_peft)
    torch.testing.assert_close(logits(reloaded), want, atol=1e-6, rtol=0)

    # the helpers: one folder
    save_reft_and_lora(reft_model, tmp_path / "both")
    assert (tmp_path / "both" / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "both" / "reft" / "reft_model.safetensors").exists()
    both = load_reft_and_lora(tiny_model("llama"), tmp_path / "both")
    assert isinstance(both.model, peft.PeftModel) and not both.training
    torch.testing.assert_close(logits(both), want, atol=1e-6, rtol=0)

    # LoRA matters: the interventions alone on the bare base model give other outputs
    alone = ReftModel.from_pretrained(tmp_path / "reft", tiny_model("llama"))
    assert (logits(alone) - want).abs().max() > 1e-4


def test_lora_applied_after_the_interventions(tmp_path):
    """LoRA injected into ``reft_model.model`` after reftlib: same files, same outputs once reloaded."""
    reft_model = reftlib.get_reft_model(tiny_model("llama"), reft_config(query=False))
    peft_model = peft.get_peft_model(reft_model.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert peft_model.get_base_model() is reft_model.model
    assert all(p.requires_grad for p in lora_params(peft_model).values())
    train(reft_model)
    want = logits(reft_model)
    with pytest.raises(ReftConfigError, match="peft_model="):
        save_reft_and_lora(reft_model, tmp_path / "both")
    save_reft_and_lora(reft_model, tmp_path / "both", peft_model=peft_model)
    reloaded = load_reft_and_lora(tiny_model("llama"), tmp_path / "both")
    torch.testing.assert_close(logits(reloaded), want, atol=1e-6, rtol=0)


def test_reload_trainable(tmp_path):
    model = lora_model()
    reft_model = reftlib.get_reft_model(model, reft_config(), disable_model_grads=False)
    save_reft_and_lora(reft_model, tmp_path)
    resumed = load_reft_and_lora(tiny_model("llama"), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in lora_params(resumed.model).values())
    assert all(p.requires_grad for p in resumed.adapters.parameters())
    assert not any(p.requires_grad for n, p in resumed.model.named_parameters() if "lora_" not in n)
    assert train(resumed, steps=2)  # trains


def test_interventions_at_the_root_next_to_lora(tmp_path):
    """``reft_model.save_pretrained(out)`` + ``peft_model.save_pretrained(out/"lora")`` loads too."""
    model = lora_model()
    reft_model = reftlib.get_reft_model(model, reft_config(), disable_model_grads=False)
    train(reft_model, steps=2)
    want = logits(reft_model)
    reft_model.save_pretrained(tmp_path)
    model.save_pretrained(str(tmp_path / "lora"))
    torch.testing.assert_close(logits(load_reft_and_lora(tiny_model("llama"), tmp_path)), want, atol=1e-6, rtol=0)


def test_helper_errors(tmp_path):
    with pytest.raises(CheckpointError, match="lora/"):
        load_reft_and_lora(tiny_model("llama"), tmp_path)
    with pytest.raises(ReftConfigError, match="plain base model"):
        load_reft_and_lora(lora_model(), tmp_path)
    unrelated = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    reft_model = reftlib.get_reft_model(tiny_model("llama"), reft_config(query=False))
    with pytest.raises(ReftConfigError, match="does not wrap"):
        save_reft_and_lora(reft_model, tmp_path / "x", peft_model=unrelated)


# --------------------------------------------------------------------------- generation
def test_generation_on_peft_model_matches_prompt_only_reference():
    model = lora_model("CAUSAL_LM")
    config = reftlib.ReftConfig(representations=[{"layer": 1, "component": "block_output", "low_rank_dimension": 4}])
    reft_model = reftlib.get_reft_model(model, config, disable_model_grads=False)
    train(reft_model, steps=3)
    prompt, mask = IDS[:, :5], MASK[:, :5]
    generated = reft_model.generate(input_ids=prompt, attention_mask=mask, unit_locations={"sources->base": (
        None, [[[4], [4]]])}, intervene_on_prompt=True, max_new_tokens=5, do_sample=False, pad_token_id=0)

    intervention = next(iter(reft_model.interventions.values()))
    reft_model.detach()  # reference: edit position 4 of the prompt forward only, by hand
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == 1:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, 4] = intervention(hidden[:, 4])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return None

    handle = model.get_base_model().model.layers[1].register_forward_hook(hook)
    with torch.no_grad():
        want = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    handle.remove()
    assert torch.equal(generated, want)


def test_generation_with_interventions_on_the_unwrapped_model():
    """Works today: attach reftlib to ``peft_model.get_base_model()`` (LoRA is injected in place)."""
    model = lora_model("CAUSAL_LM")
    config = reftlib.ReftConfig(representations=[{"layer": 1, "component": "block_output", "low_rank_dimension": 4}])
    reft_model = reftlib.get_reft_model(model.get_base_model(), config, disable_model_grads=False)
    assert all(p.requires_grad for p in lora_params(model).values())
    train(reft_model, steps=3)
    prompt, mask = IDS[:, :5], MASK[:, :5]
    locations = {"sources->base": (None, [[[4], [4]]])}
    generated = reft_model.generate(input_ids=prompt, attention_mask=mask, unit_locations=locations,
                                    max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # the same as step-by-step greedy decoding without a cache
        ids = prompt
        for _ in range(5):
            out = reft_model(input_ids=ids, attention_mask=torch.ones_like(ids), unit_locations=locations, use_cache=False)
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


# --------------------------------------------------------------------------- trainer
def test_reft_trainer_trains_lora_and_interventions(tmp_path):
    training = pytest.importorskip("reftlib.training")
    from tiny_tokenizer import tiny_tokenizer
    from transformers import TrainingArguments

    tokenizer = tiny_tokenizer("llama")
    model = lora_model("CAUSAL_LM")
    config = reftlib.ReftConfig(representations=[{"layer": 1, "component": "block_output", "low_rank_dimension": 4},
                                                 {"layer": 0, "component": "query_output", "low_rank_dimension": 2}])
    reft_model = reftlib.get_reft_model(model, config, disable_model_grads=False)
    module = training.make_last_position_supervised_data_module(
        tokenizer, reft_model, ["apple", "banana", "cherry", "date"], ["r", "y", "d", "b"], num_interventions=2)
    lora_before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    reft_before = {n: p.detach().clone() for n, p in reft_model.adapters.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=2e-2,
                             max_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             lr_scheduler_type="constant", seed=0, dataloader_num_workers=0)
    trainer = training.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **module)
    trainer.train()
    assert any(not torch.equal(p, lora_before[n]) for n, p in lora_params(model).items())
    assert all(not torch.equal(v, reft_before[k]) for k, v in reft_model.adapters.state_dict().items())
    reft_model.eval()
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    batch.pop("labels")
    with torch.no_grad():
        want = reft_model(**batch).logits
    save_reft_and_lora(reft_model, tmp_path / "out")
    reloaded = load_reft_and_lora(tiny_model("llama"), tmp_path / "out")
    with torch.no_grad():
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_trainer_checkpoints_hold_lora_and_resume_restores_it(tmp_path):
    training = pytest.importorskip("reftlib.training")
    from tiny_tokenizer import tiny_tokenizer
    from transformers import TrainingArguments

    tokenizer = tiny_tokenizer("llama")
    config = reftlib.ReftConfig(representations=[{"layer": 1, "component": "block_output", "low_rank_dimension": 4}])
    prompts, answers = ["apple", "banana", "cherry", "date"], ["r", "y", "d", "b"]

    def run(folder, seed, **kwargs):
        model = lora_model("CAUSAL_LM", seed=0)
        torch.manual_seed(seed)
        for param in lora_params(model).values():  # distinct starting LoRA weights per run
            torch.nn.init.normal_(param, std=0.05)
        reft_model = reftlib.get_reft_model(model, config, disable_model_grads=False)
        module = training.make_last_position_supervised_data_module(tokenizer, reft_model, prompts, answers,
                                                                     num_interventions=1)
        args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=2, learning_rate=2e-2,
                                 max_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps",
                                 save_steps=2, seed=0, dataloader_num_workers=0)
        trainer = training.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **module)
        return trainer, model, reft_model

    trainer, model, reft_model = run(tmp_path / "a", seed=1)
    trainer.train()
    assert (tmp_path / "a" / "checkpoint-2" / "lora" / "adapter_model.safetensors").is_file()
    expected_lora = {n: p.detach().clone() for n, p in lora_params(model).items()}
    expected_reft = {k: v.clone() for k, v in reft_model.adapters.state_dict().items()}

    resumed, model_b, reft_b = run(tmp_path / "b", seed=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for name, value in lora_params(model_b).items():
        torch.testing.assert_close(value, expected_lora[name], atol=1e-6, rtol=0, msg=name)
    for key, value in reft_b.adapters.state_dict().items():
        torch.testing.assert_close(value, expected_reft[key], atol=1e-6, rtol=0, msg=key)

    # a checkpoint without LoRA weights cannot resume a LoRA run silently
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoint-2" / "lora")
    with pytest.raises(CheckpointError, match="no lora/ folder"):
        resumed._load_from_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
