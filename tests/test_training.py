"""ReftTrainer family: loss, gradient accumulation, checkpoints, resume, weight decay, classification."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_config, tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForMaskedLM, TrainingArguments

import reftlib
from reftlib.errors import CheckpointError, ReftConfigError
from reftlib.training import (
    ReftModelForSequenceClassification,
    ReftTrainer,
    ReftTrainerForCausalLM,
    ReftTrainerForSequenceClassification,
    get_reft_model_for_sequence_classification,
    make_classification_data_module,
    make_multiple_position_supervised_data_module,
)

PROMPTS = ["apple", "banana split", "cherry", "date", "elder", "fig tree", "grape", "honeydew"]
OUTPUTS = ["r", "ye", "d", "b", "ee", "g", "p", "hh"]


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


def base_lm(seed: int = 0):
    """A tiny Llama whose LM head is large enough for confident predictions (memorization is possible)."""
    model = tiny_model("llama", seed=seed)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
    return model


def reft_lm(model=None, layers=(0, 1, 2), rank=8, seed=7):
    torch.manual_seed(seed)
    reps = [{"layer": layer, "intervention": reftlib.LoreftIntervention(low_rank_dimension=rank)} for layer in layers]
    return reftlib.get_reft_model(model if model is not None else base_lm(), reftlib.ReftConfig(representations=reps))


def data(tok, reft_model, n=4, **kwargs):
    kwargs.setdefault("positions", "f3+l3")
    kwargs.setdefault("share_weights", True)
    return make_multiple_position_supervised_data_module(
        tok, reft_model, PROMPTS[:n], OUTPUTS[:n], num_interventions=len(reft_model.interventions), **kwargs
    )


def args(path, **kwargs):
    defaults = dict(
        output_dir=str(path), per_device_train_batch_size=4, learning_rate=3e-2, max_steps=2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, lr_scheduler_type="constant",
        seed=0, dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def intervention_state(reft_model):
    return {k: v.detach().clone() for k, v in reft_model.adapters.state_dict().items()}


def assert_states_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def batch_loss(reft_model, module):
    rows = [module["train_dataset"][i] for i in range(len(module["train_dataset"]))]
    batch = module["data_collator"](rows)
    with torch.no_grad():
        return reft_model(**batch).loss.item()


# --------------------------------------------------------------------------- learning
def test_loss_decreases_when_memorizing(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    before = batch_loss(reft_model, module)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path, max_steps=25), **module)
    trainer.train()
    reft_model.eval()
    after = batch_loss(reft_model, module)
    assert after < 0.5 * before, (before, after)
    assert all(not p.requires_grad for p in reft_model.model.parameters())


def test_loss_matches_the_base_model_loss(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path), **module)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    with torch.no_grad():
        ours = trainer.compute_loss(reft_model, dict(batch))
        theirs = reft_model(**batch).loss  # HF's causal-LM loss (mean over supervised tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_lm_head_runs_only_on_supervised_positions(tok, tmp_path):
    """The LM head computes supervised positions only (gathered, else trailing ones): same loss and gradients."""
    reft_model = reft_lm()
    module = data(tok, reft_model)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path), **module)
    batch = trainer._prepare_inputs(module["data_collator"]([module["train_dataset"][i] for i in range(4)]))
    assert batch["labels"].device.type == "cpu"
    head_rows = []
    handle = reft_model.model.lm_head.register_forward_hook(lambda m, a, out: head_rows.append(tuple(out.shape[:2])))

    def loss_and_grads():
        reft_model.zero_grad()
        loss = trainer.compute_loss(reft_model, dict(batch), num_items_in_batch=torch.tensor(9))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in reft_model.named_parameters() if p.requires_grad}

    try:
        gathered = loss_and_grads()
        trainer._head_on_supervised = False  # trailing positions only (logits_to_keep)
        trimmed = loss_and_grads()
        trainer._logits_to_keep_supported = False  # what a model without the argument gets
        full = loss_and_grads()
    finally:
        handle.remove()
    seq_len = batch["input_ids"].shape[1]
    first_target = int((batch["labels"] != -100).any(0).nonzero()[0]) - 1
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert supervised < 4 * (seq_len - first_target)  # the test data has something to gather
    assert head_rows == [(1, supervised), (4, seq_len - first_target), (4, seq_len)], head_rows
    for result in (gathered, trimmed):
        torch.testing.assert_close(result[0], full[0], atol=1e-6, rtol=1e-6)
        assert result[1].keys() == full[1].keys()
        for name in full[1]:
            torch.testing.assert_close(result[1][name], full[1][name], atol=1e-6, rtol=1e-5, msg=name)

    # evaluation with predictions keeps every position's logits
    trainer._logits_to_keep_supported = None
    with torch.no_grad():
        _, outputs = trainer.compute_loss(reft_model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == (4, seq_len)


class _PerRowLogitsLlama(type(base_lm())):
    """A causal LM that reshapes its logits per row after the head (as some remote-code models do)."""

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits.reshape(input_ids.shape[0], -1, out.logits.shape[-1])
        return out


def test_lm_head_gather_falls_back_when_the_model_reshapes_logits(tok, tmp_path):
    model = _PerRowLogitsLlama(base_lm().config)
    model.load_state_dict(base_lm().state_dict())
    reft_model = reft_lm(model)
    module = data(tok, reft_model)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path), **module)
    batch = trainer._prepare_inputs(module["data_collator"]([module["train_dataset"][i] for i in range(4)]))
    with torch.no_grad():
        probed = trainer.compute_loss(reft_model, dict(batch))
        assert trainer._head_on_supervised is False
        trainer._logits_to_keep_supported = False
        full = trainer.compute_loss(reft_model, dict(batch))
    torch.testing.assert_close(probed, full, atol=1e-6, rtol=1e-6)


def test_gradient_accumulation_equals_full_batch(tok, tmp_path):
    # Outputs of different lengths: a mean of per-micro-batch means would differ from the full-batch mean.
    states = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        reft_model = reft_lm()
        trainer = ReftTrainerForCausalLM(
            model=reft_model, tokenizer=tok, **data(tok, reft_model),
            args=args(tmp_path / str(batch_size), per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
                      max_grad_norm=0.0),
        )
        trainer.train()
        states.append(intervention_state(reft_model))
    # one SGD step on both paths: they differ only by fp32 reordering of the gradient sums, a few ulp of
    # the states' scale (~2 here, measured up to 4e-7); 1e-5 of that scale is ~40 ulp
    scale = max(float(v.abs().max()) for v in states[0].values())
    assert_states_close(states[0], states[1], atol=1e-5 * scale)
    assert not torch.equal(states[0]["default.layer_0_block_output.learned_source.weight"],
                           intervention_state(reft_lm())["default.layer_0_block_output.learned_source.weight"])


def test_plain_reft_trainer_uses_the_model_loss(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    before = intervention_state(reft_model)
    trainer = ReftTrainer(model=reft_model, processing_class=tok, args=args(tmp_path, max_steps=1), **module)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in intervention_state(reft_model).items())


# --------------------------------------------------------------------------- trainer plumbing
def test_default_remove_unused_columns_keeps_positions(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    module["train_dataset"] = module["train_dataset"].add_column("id", list(range(4)))
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path, max_steps=1), **module)
    assert trainer.args.remove_unused_columns
    kept = trainer._remove_unused_columns(module["train_dataset"]).column_names
    assert sorted(kept) == ["input_ids", "intervention_locations", "labels"]
    trainer.train()


def test_positions_stay_on_cpu_and_tokenizer_alias(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path), **module)
    assert trainer.processing_class is tok
    batch = module["data_collator"]([module["train_dataset"][0]])
    prepared = trainer._prepare_inputs(batch)
    assert prepared["intervention_locations"].device.type == "cpu"
    with pytest.raises(ReftConfigError, match="once"):
        ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, processing_class=tiny_tokenizer(), args=args(tmp_path))
    with pytest.raises(ReftConfigError, match="get_reft_model"):
        ReftTrainerForCausalLM(model=base_lm(), tokenizer=tok, args=args(tmp_path))


def test_weight_decay_groups(tok, tmp_path):
    reps = [
        {"layer": 0, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)},
        {"component": "model.layers.1.input_layernorm", "intervention": reftlib.DireftIntervention(low_rank_dimension=2)},
    ]
    reft_model = reftlib.get_reft_model(base_lm(), reftlib.ReftConfig(representations=reps))
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path, weight_decay=0.1))
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in reft_model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)].split(".", 2)[2] for p in g["params"])
              for g in optimizer.param_groups}
    assert groups[0.1] == sorted([
        "layer_0_block_output.learned_source.weight", "layer_0_block_output.rotate_layer.raw",
        "model_layers_1_input_layernorm.learned_source.weight", "model_layers_1_input_layernorm.rotate_layer.raw",
    ])
    assert groups[0.0] == sorted([
        "layer_0_block_output.learned_source.bias", "model_layers_1_input_layernorm.learned_source.bias",
    ])


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    reft_model.train()

    def grads():
        reft_model.zero_grad(set_to_none=True)
        reft_model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in reft_model.adapters.named_parameters()}

    plain = grads()
    reft_model.gradient_checkpointing_enable()
    from reftlib.runtime import is_checkpointing

    assert is_checkpointing(reft_model.model)  # is_activation_checkpointing (transformers 5) / is_gradient_checkpointing
    checkpointed = grads()
    reft_model.gradient_checkpointing_disable()
    assert_states_close(plain, checkpointed, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in plain.values())


@pytest.mark.parametrize("enable", ["reftlib", "base model"])
def test_checkpointing_recomputes_each_call_with_its_own_positions(tok, enable):
    """Two forwards at different positions, one backward (DPO's chosen + rejected), then another step."""
    reft_model = reft_lm()
    module = data(tok, reft_model)
    rows = [module["train_dataset"][i] for i in range(4)]
    first, second = module["data_collator"](rows[:2]), module["data_collator"](rows[2:])
    second["intervention_locations"] = second["intervention_locations"].flip(-1)  # other positions
    reft_model.train()

    def grads(two_calls: bool):
        reft_model.zero_grad(set_to_none=True)
        loss = reft_model(**first).loss
        if two_calls:
            loss = loss + 0.5 * reft_model(**second).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in reft_model.adapters.named_parameters()}

    plain = [grads(True), grads(False)]
    if enable == "reftlib":
        reft_model.gradient_checkpointing_enable()
    else:  # enabled on the base model directly: reftlib keeps the last call's state (one forward per backward)
        reft_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = [grads(True), grads(False)] if enable == "reftlib" else [plain[0], grads(False)]
    reft_model.gradient_checkpointing_disable()
    for want, got in zip(plain, checkpointed):
        assert_states_close(want, got, atol=1e-5)


def test_trainer_with_gradient_checkpointing_matches(tok, tmp_path):
    states = []
    for checkpointing in (False, True):
        reft_model = reft_lm()
        trainer = ReftTrainerForCausalLM(
            model=reft_model, tokenizer=tok, **data(tok, reft_model),
            args=args(tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing),
        )
        trainer.train()
        states.append(intervention_state(reft_model))
    assert_states_close(states[0], states[1], atol=1e-5)


def test_bf16_autocast_on_cpu(tok, tmp_path):
    reft_model = reft_lm()
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path, bf16=True, max_steps=3),
                                     **data(tok, reft_model))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(p.dtype == torch.float32 for p in reft_model.adapters.parameters())


# --------------------------------------------------------------------------- checkpoints
def test_checkpoints_hold_reft_files_and_reload(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(4)])
    batch.pop("labels")
    reft_model.eval()
    with torch.no_grad():  # no-grad calls cache LoReFT's rotation; the fused optimizer must not leave it stale
        reft_model(**batch)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, **module,
                                     args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2))
    assert trainer.args.optim == "adamw_torch_fused"
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"reft_config.json", "reft_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    assert all(k.startswith("layer_") for k in load_file(checkpoint / "reft_model.safetensors"))

    loaded = reftlib.ReftModel.from_pretrained(checkpoint, base_lm())
    reft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, reft_model(**batch).logits, atol=0, rtol=0)

    trainer.save_model(tmp_path / "final")
    assert {"reft_config.json", "reft_model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "final"))


def test_resume_continues_with_the_same_weights(tok, tmp_path):
    reft_model = reft_lm()
    kwargs = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                  lr_scheduler_type="linear", learning_rate=1e-2)
    full = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, args=args(tmp_path / "a", **kwargs),
                                  **data(tok, reft_model, n=8))
    full.train()
    expected = intervention_state(reft_model)

    resumed_model = reft_lm(seed=99)  # different initial weights: the checkpoint must overwrite them
    resumed = ReftTrainerForCausalLM(model=resumed_model, tokenizer=tok, args=args(tmp_path / "b", **kwargs),
                                     **data(tok, resumed_model, n=8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert_states_close(intervention_state(resumed_model), expected, atol=1e-6)

    with pytest.raises(CheckpointError, match="not a checkpoint written by a reftlib trainer"):
        resumed._load_from_checkpoint(str(tmp_path))


def test_load_best_model_at_end(tok, tmp_path):
    reft_model = reft_lm()
    module = data(tok, reft_model)
    module["eval_dataset"] = module["train_dataset"]
    trainer = ReftTrainerForCausalLM(
        model=reft_model, tokenizer=tok, **module,
        args=args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                  load_best_model_at_end=True, metric_for_best_model="loss", learning_rate=0.3),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(os.path.join(best, "reft_model.safetensors"))
    current = {k: v.detach() for k, v in reft_model.adapters["default"].state_dict().items()}
    assert_states_close(current, saved, atol=0)


# --------------------------------------------------------------------------- classification
TEXTS = ["good movie", "bad film", "great fun", "awful plot", "nice cast", "poor acting", "fine story", "dull end"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def classifier_base(family: str):
    """Tiny random models; the BERT gets larger weights so that its [CLS] state depends on the text
    (with the default 0.02 init it varies by ~0.003 across texts, and nothing can be learned from it)."""
    if family != "bert":
        return tiny_model(family)
    config = tiny_config("bert")
    config.initializer_range, config.hidden_dropout_prob, config.attention_probs_dropout_prob = 0.2, 0.0, 0.0
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_classification_trains_saves_and_loads(family, tmp_path):
    style = "bert" if family == "bert" else "llama"
    tok = tiny_tokenizer(style)
    torch.manual_seed(3)
    reps = [{"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)}]
    reft_model = get_reft_model_for_sequence_classification(classifier_base(family), reps, num_labels=2)
    assert reft_model.pooling == ("first" if family == "bert" else "last")
    module = make_classification_data_module(tok, reft_model, TEXTS, LABELS)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(8)])
    with torch.no_grad():
        before = reft_model(**batch).loss.item()
    trainer = ReftTrainerForSequenceClassification(
        model=reft_model, tokenizer=tok, **module,
        args=args(tmp_path, per_device_train_batch_size=8, max_steps=25, learning_rate=5e-2, save_strategy="steps",
                  save_steps=25),
    )
    trainer.train()
    reft_model.eval()
    with torch.no_grad():
        trained = reft_model(**batch)
    assert trained.loss.item() < 0.5 * before, (before, trained.loss.item())
    head = reft_model.classifier.out_proj
    assert head.weight.requires_grad

    loaded = ReftModelForSequenceClassification.from_pretrained(tmp_path / "checkpoint-25", classifier_base(family))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained.logits, atol=0, rtol=0)
    assert loaded.pooling == reft_model.pooling and loaded.num_labels == 2
    assert not loaded.classifier.out_proj.weight.requires_grad

    metrics = trainer.evaluate(module["train_dataset"])
    assert math.isfinite(metrics["eval_loss"])

    plain = tmp_path / "plain"
    reftlib.ReftModel.save_pretrained(reftlib.get_reft_model(tiny_model(family), reps[0] | {
        "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)}), plain)
    with pytest.raises(CheckpointError, match="no classification head"):
        ReftModelForSequenceClassification.from_pretrained(plain, tiny_model(family))


def test_classification_regression_and_decay_groups(tmp_path):
    tok = tiny_tokenizer("llama")
    reps = [{"layer": 0, "intervention": reftlib.DireftIntervention(low_rank_dimension=2)}]
    reft_model = get_reft_model_for_sequence_classification(tiny_model("llama"), reps, num_labels=1)
    assert reft_model.problem_type == "regression"
    module = make_classification_data_module(tok, reft_model, TEXTS[:4], [0.5, -1.0, 2.0, 0.0])
    trainer = ReftTrainerForSequenceClassification(
        model=reft_model, tokenizer=tok, **module, args=args(tmp_path, max_steps=3, weight_decay=0.1),
    )
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    decay = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(reft_model.classifier.out_proj.weight) in decay
    assert id(reft_model.classifier.out_proj.bias) not in decay
    with pytest.raises(ReftConfigError, match="ReftModelForSequenceClassification"):
        ReftTrainerForSequenceClassification(model=reft_lm(), tokenizer=tok, args=args(tmp_path))


def test_classification_multi_label_left_padding_and_checkpointing(tmp_path):
    tok = tiny_tokenizer("llama")
    reps = [{"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}]
    torch.manual_seed(0)
    reft_model = get_reft_model_for_sequence_classification(
        tiny_model("llama"), reps, num_labels=3, problem_type="multi_label_classification"
    )
    labels = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    right = make_classification_data_module(tok, reft_model, TEXTS[:4], labels)
    left = make_classification_data_module(tok, reft_model, TEXTS[:4], labels, padding_side="left")
    rows = [right["train_dataset"][i] for i in range(4)]
    rb, lb = right["data_collator"](rows), left["data_collator"](rows)
    from helpers import randomize

    randomize(reft_model)
    reft_model.eval()
    with torch.no_grad():  # the head reads the last real token whatever the padding side
        torch.testing.assert_close(reft_model(**rb).logits, reft_model(**lb).logits, atol=1e-5, rtol=1e-4)

    reft_model.train()

    def grads():
        reft_model.zero_grad(set_to_none=True)
        reft_model(**rb).loss.backward()
        return {n: p.grad.clone() for n, p in reft_model.named_parameters() if p.requires_grad}

    plain = grads()
    reft_model.gradient_checkpointing_enable()
    checkpointed = grads()
    reft_model.gradient_checkpointing_disable()
    assert_states_close(plain, checkpointed, atol=1e-5)
    assert any(k.startswith("classifier.") for k in plain) and any(k.startswith("adapters.") for k in plain)

    trainer = ReftTrainerForSequenceClassification(model=reft_model, tokenizer=tok, **right,
                                                   args=args(tmp_path, max_steps=2))
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_push_from_checkpoint_uploads_the_reft_files(tok, tmp_path, monkeypatch):
    from concurrent.futures import Future

    import transformers.trainer as hf_trainer

    uploaded = []

    class FakeApi:
        def upload_folder(self, folder_path, **kwargs):
            uploaded.append(sorted(os.listdir(folder_path)))
            done = Future()
            done.set_result(None)
            return done

    if hasattr(hf_trainer, "hf_api"):  # transformers 5
        monkeypatch.setattr(hf_trainer, "hf_api", FakeApi)
    else:  # transformers 4: module-level huggingface_hub.upload_folder
        monkeypatch.setattr(hf_trainer, "upload_folder", lambda folder_path, **kw: FakeApi().upload_folder(folder_path))
    reft_model = reft_lm()
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, **data(tok, reft_model),
                                     args=args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1))
    trainer.train()
    trainer.hub_model_id, trainer.push_in_progress = "me/reft", None
    trainer._push_from_checkpoint(str(tmp_path / "checkpoint-1"))
    assert {"reft_config.json", "reft_model.safetensors"} <= set(uploaded[0])
