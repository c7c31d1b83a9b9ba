"""LoFiT: head selection (L1 in the loss, ranking, clean model), offsets, persistence, plotting, merging."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import reftlib
from reftlib.errors import CheckpointError, InputError, ReftConfigError
from reftlib.lofit import (
    HeadScaleDPOTrainer,
    HeadScaleTrainer,
    HeadSelection,
    MergeError,
    MissingDependencyError,
    ReftDPODataCollator,
    count_heads,
    dpo_loss,
    lofit_config,
    make_preference_dataset,
    make_sft_dataset,
    merge_and_unload,
    select_heads,
    sequence_logps,
    tune_offsets,
)
from reftlib.training import ReftDataCollator, ReftTrainerForCausalLM

FAMILIES = ["llama", "gemma", "gpt2"]
PAIRS = [("apple", " red"), ("banana", " yellow"), ("cherry", " dark"), ("grape", " green"),
         ("lemon", " sour"), ("plum", " purple"), ("kiwi", " furry"), ("lime", " tart")]
TRIPLES = [(p, a, " " + a[::-1].strip() + "x") for p, a in PAIRS]
QUIET = {"disable_tqdm": True, "logging_steps": 1}
IDS = torch.tensor([[1, 20, 31, 42, 53, 64, 75], [1, 33, 44, 55, 66, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


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


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kwargs).logits


def strong_model(family="llama", seed=0):
    """A tiny model whose LM head is large enough for confident predictions (so training can show)."""
    model = tiny_model(family, seed=seed)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
    return model


def scale_model(family="llama", seed=0):
    config = reftlib.ReftConfig([
        {"layer": layer, "component": "head_output", "intervention": reftlib.HeadScaleIntervention()}
        for layer in range(3)
    ])
    return reftlib.get_reft_model(tiny_model(family, seed=seed), config)


def args(tmp_path, **kwargs):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=1,
                  report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    values.update(kwargs)
    return TrainingArguments(**values)


# --------------------------------------------------------------------------- step 1: selection
@pytest.mark.parametrize("family", FAMILIES)
def test_select_heads_ranks_heads_and_leaves_model_clean(family, tok):
    model = tiny_model(family)
    hooks, before = hook_counts(model), logits(model)
    model.lm_head.weight.requires_grad_(False)  # some flag pattern to restore exactly
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    eos = model.config.eos_token_id

    selection = select_heads(model, tok, PAIRS, k=5, l1=1e-3, lr=1e-2, epochs=2, batch_size=4, training_args=QUIET)

    assert selection.scores.shape == (3, 4) == (*count_heads(model),)
    assert len(selection.heads) == 5 == len(set(selection.heads))
    ranked = [float(selection.scores[layer, head]) for layer, head in selection.heads]
    assert ranked == sorted(ranked, reverse=True) == selection.head_scores
    assert min(ranked) >= float(selection.scores.flatten().sort(descending=True).values[4])
    assert selection.settings["objective"] == "sft" and selection.settings["steps"] == 4
    # the model is clean: no hooks, same flags, same mode, same config, same outputs
    assert hook_counts(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert model.config.eos_token_id == eos
    model.eval()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_select_heads_head_dim_and_gqa_shapes(tok):
    """Gemma's tiny config has head_dim*heads (64) != hidden (32), Llama's uses grouped-query attention."""
    gemma = tiny_model("gemma")
    assert gemma.config.head_dim * gemma.config.num_attention_heads != gemma.config.hidden_size
    reft = scale_model("gemma")
    assert reft.interventions["layer_0_head_output"].scale.shape == (4, gemma.config.head_dim)
    llama = tiny_model("llama")
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    assert count_heads(llama) == (3, 4)


def test_fraction_and_k_validation(tok):
    model = tiny_model("llama")
    assert select_heads(model, tok, PAIRS, fraction=0.25, epochs=1, training_args=QUIET).k == 3
    assert select_heads(model, tok, PAIRS, epochs=1, training_args=QUIET).k == 1  # default 3 % of 12, at least one
    for bad in (dict(k=0), dict(k=13), dict(k=2, fraction=0.1), dict(fraction=1.5), dict(k=2.0)):
        with pytest.raises(ReftConfigError):
            select_heads(model, tok, PAIRS, training_args=QUIET, **bad)
    with pytest.raises(ReftConfigError, match="l1"):
        select_heads(model, tok, PAIRS, k=2, l1=-1.0)
    with pytest.raises(InputError, match="triples"):
        select_heads(model, tok, PAIRS, k=2, objective="dpo")
    with pytest.raises(ReftConfigError, match="objective"):
        select_heads(model, tok, PAIRS, k=2, objective="ppo")
    with pytest.raises(InputError, match="mixes"):
        select_heads(model, tok, [PAIRS[0], TRIPLES[1]], k=2)
    assert hook_counts(model) == 0  # failures detach too


def test_l1_term_is_in_the_loss(tmp_path, tok):
    reft_model = scale_model()
    randomize(reft_model, scale=0.3)
    dataset = make_sft_dataset(tok, PAIRS[:4], model=reft_model)
    batch = ReftDataCollator(tokenizer=tok)([dataset[i] for i in range(4)])
    trainer = HeadScaleTrainer(model=reft_model, args=args(tmp_path), train_dataset=dataset, tokenizer=tok,
                               l1_lambda=0.05)
    loss = trainer.compute_loss(reft_model, dict(batch))

    out = reft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    targets = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    penalty = sum(iv.scale.abs().sum() for iv in reft_model.interventions.values())
    torch.testing.assert_close(loss, ce + 0.05 * penalty)
    assert float(0.05 * penalty.detach()) > 0.1  # the term is not negligible in this check
    # the gradient of the scales includes the L1 subgradient
    loss.backward()
    scale = reft_model.interventions["layer_0_head_output"].scale
    assert scale.grad is not None and scale.grad.abs().sum() > 0

    # with gradient accumulation (loss normalized over the accumulated batch) the penalty is split
    plain = ReftTrainerForCausalLM(model=reft_model, args=args(tmp_path), train_dataset=dataset, tokenizer=tok)
    trainer.current_gradient_accumulation_steps = 2
    items = (targets != -100).sum()
    with torch.no_grad():
        split = trainer.compute_loss(reft_model, dict(batch), num_items_in_batch=items)
        base = plain.compute_loss(reft_model, dict(batch), num_items_in_batch=items)
    torch.testing.assert_close(split, base + 0.05 * penalty.detach() / 2)


def test_l1_term_in_the_dpo_loss(tmp_path, tok):
    reft_model = scale_model()
    randomize(reft_model, scale=0.3)
    dataset = make_preference_dataset(tok, TRIPLES[:4], model=reft_model)
    batch = ReftDPODataCollator(tokenizer=tok)([dataset[i] for i in range(4)])
    trainer = HeadScaleDPOTrainer(model=reft_model, args=args(tmp_path), train_dataset=dataset, tokenizer=tok,
                                  l1_lambda=0.02, beta=0.2)
    with torch.no_grad():
        loss = trainer.compute_loss(reft_model, dict(batch))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy = sequence_logps(reft_model, inputs, batch["labels"])
        with reft_model.disable_interventions():
            reference = sequence_logps(reft_model, inputs, batch["labels"])
    expected, _ = dpo_loss(policy[:4], policy[4:], reference[:4], reference[4:], beta=0.2)
    penalty = sum(iv.scale.abs().sum() for iv in reft_model.interventions.values())
    torch.testing.assert_close(loss, expected + 0.02 * penalty)


def test_l1_shrinks_the_scales(tok):
    def total_norm(l1):
        model = tiny_model("llama")
        selection = select_heads(model, tok, PAIRS, k=2, l1=l1, lr=1e-2, epochs=4, batch_size=4, training_args=QUIET)
        return float(selection.scores.sum())

    assert total_norm(0.5) < 0.5 * total_norm(0.0)


def test_dpo_selection_uses_the_preference_data(tok):
    selection = select_heads(tiny_model("llama"), tok, TRIPLES, k=3, epochs=1, batch_size=4, training_args=QUIET)
    assert selection.settings["objective"] == "dpo" and selection.k == 3
    sft = select_heads(tiny_model("llama"), tok, TRIPLES, k=3, epochs=1, batch_size=4, objective="sft",
                       training_args=QUIET)
    assert sft.settings["objective"] == "sft"


def test_dict_rows_are_accepted(tok):
    rows = [{"prompt": p, "answer": a} for p, a in PAIRS]
    assert select_heads(tiny_model("llama"), tok, rows, k=2, epochs=1, training_args=QUIET).k == 2
    with pytest.raises(InputError, match="answer"):
        select_heads(tiny_model("llama"), tok, [{"prompt": "a", "reply": "b"}], k=2)


# --------------------------------------------------------------------------- the selection object
def test_selection_save_load_roundtrip(tmp_path):
    scores = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) * 1e-3
    selection = HeadSelection(scores, 4, {"l1": 1e-3, "note": ("a", 1)})
    folder_file = selection.save(tmp_path / "sel")
    assert folder_file.name == "head_selection.json"
    for path in (tmp_path / "sel", tmp_path / "one.json"):
        if path.suffix:
            selection.save(path)
        loaded = HeadSelection.load(path)
        assert torch.equal(loaded.scores, selection.scores)  # exact float32 values
        assert loaded.heads == selection.heads and loaded.k == 4
        assert loaded.settings == {"l1": 1e-3, "note": ["a", 1]}
    data = json.loads((tmp_path / "one.json").read_text())
    assert data["heads"] == [list(h) for h in selection.heads]
    data["heads"][0] = [0, 0] if data["heads"][0] != [0, 0] else [0, 1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match"):
        HeadSelection.load(tmp_path / "bad.json")
    (tmp_path / "trunc.json").write_text("{")
    with pytest.raises(CheckpointError):
        HeadSelection.load(tmp_path / "trunc.json")
    with pytest.raises(CheckpointError):
        HeadSelection.load(tmp_path / "missing")


def test_selection_ranking_top_and_config():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.0, 0.9]])
    selection = HeadSelection(scores, 3)
    assert selection.heads == [(0, 1), (1, 2), (1, 0)]  # ties: lower layer first
    assert selection.by_layer() == {0: [1], 1: [0, 2]}
    assert selection.top(1).heads == [(0, 1)]
    assert selection.top(fraction=0.5).k == 3
    config = selection.to_reft_config()
    reps = config.representations
    assert [(r.layer, r.component, r.positions, r.intervention.heads) for r in reps] == [
        (0, "head_output", None, [1]), (1, "head_output", None, [0, 2])]
    assert "HeadSelection(k=3" in repr(selection)
    with pytest.raises(ReftConfigError):
        HeadSelection(torch.zeros(3), 1)
    with pytest.raises(ReftConfigError):
        lofit_config([(0, 1), (0, 1)])
    with pytest.raises(ReftConfigError):
        lofit_config([(0, "a")])


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    selection = HeadSelection(torch.rand(30, 9), 8)
    path = selection.plot(tmp_path / "plots" / "heads.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependencyError, match=r'pip install "reftlib\[plot\]"'):
        HeadSelection(torch.rand(2, 2), 1).plot(tmp_path / "x.png")


# --------------------------------------------------------------------------- step 2: offsets
@pytest.mark.parametrize("family", FAMILIES)
def test_tune_offsets_trains_only_offsets(family, tok):
    model = tiny_model(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    heads = [(2, 1), (0, 3), (2, 0)]
    reft_model = tune_offsets(model, heads, PAIRS, tokenizer=tok, lr=5e-2, epochs=8, batch_size=4,
                              training_args=QUIET)
    assert isinstance(reft_model, reftlib.ReftModel) and not reft_model.training
    ivs = reft_model.interventions
    assert sorted(ivs) == ["layer_0_head_output", "layer_2_head_output"]
    assert all(type(iv) is reftlib.HeadBiasIntervention for iv in ivs.values())
    assert ivs["layer_2_head_output"].heads == [0, 1] and ivs["layer_0_head_output"].heads == [3]
    assert all(r.positions is None for r in reft_model.reft_config.representations)
    head_dim = ivs["layer_0_head_output"].head_dim
    assert ivs["layer_2_head_output"].bias.shape == (2, head_dim)
    # the base model did not change; the offsets moved away from their N(0, 1e-3) init
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(iv.bias.abs().max() > 1e-2 for iv in ivs.values())


def test_tune_offsets_loss_decreases_in_the_trainer_log(tok, monkeypatch):
    seen = {}
    from reftlib.lofit import _fit

    original = _fit.fit

    def spy(*args, **kwargs):
        trainer = original(*args, **kwargs)
        seen["log"] = trainer.state.log_history
        return trainer

    monkeypatch.setattr("reftlib.lofit.offsets.fit", spy)
    tune_offsets(strong_model("llama"), [(1, 0), (2, 3), (2, 1)], PAIRS, tokenizer=tok, lr=5e-2, epochs=10,
                 batch_size=4, training_args=QUIET)
    losses = [e["loss"] for e in seen["log"] if "loss" in e]
    assert len(losses) == 20 and sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_offsets_save_and_load(tmp_path, tok):
    model = tiny_model("llama")
    selection = HeadSelection(torch.rand(3, 4, generator=torch.Generator().manual_seed(3)), 3)
    reft_model = tune_offsets(model, selection, TRIPLES, tokenizer=tok, epochs=2, batch_size=4, lr=5e-2,
                              training_args=QUIET)
    expected = logits(reft_model)
    reft_model.save_pretrained(tmp_path / "lofit")
    selection.save(tmp_path / "lofit")
    saved = json.loads((tmp_path / "lofit" / "reft_config.json").read_text())
    stored = {r["layer"]: r["intervention"]["heads"] for r in saved["representations"]}
    assert stored == selection.by_layer()
    loaded = reftlib.ReftModel.from_pretrained(tmp_path / "lofit", tiny_model("llama"))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    assert HeadSelection.load(tmp_path / "lofit").heads == selection.heads


# --------------------------------------------------------------------------- merge
def stacked_lofit(family: str, seed: int = 0) -> reftlib.ReftModel:
    """Scales and offsets on several layers, two interventions on one site, and a second adapter on top."""
    torch.manual_seed(seed)
    config = reftlib.ReftConfig([
        {"layer": 0, "component": "head_output", "intervention": reftlib.HeadScaleIntervention()},
        {"layer": 0, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1, 3])},
        {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[2])},
    ])
    reft_model = reftlib.get_reft_model(tiny_model(family, seed=seed), config)
    reft_model.add_adapter("more", lofit_config([(0, 0), (1, 2)]), set_active=True)
    reft_model.add_adapter(
        "scale2", reftlib.ReftConfig([{"layer": 0, "component": "head_output",
                                       "intervention": reftlib.HeadScaleIntervention()}]), set_active=True)
    randomize(reft_model, scale=0.5)
    reft_model.eval()
    return reft_model


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_matches_unmerged_and_reloads_with_plain_transformers(family, tmp_path):
    reft_model = stacked_lofit(family)
    assert reft_model.active_adapters == ["default", "more", "scale2"]
    expected = logits(reft_model)
    assert (expected - logits(reft_model.model)).abs().max() > 1e-2  # the interventions matter
    prompt = torch.tensor([[1, 40, 41, 42], [0, 1, 50, 51]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    gen_kwargs = dict(attention_mask=prompt_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = reft_model.generate(input_ids=prompt, mode="all", **gen_kwargs)

    merged = merge_and_unload(reft_model)

    assert type(merged).__module__.startswith("transformers.") and hook_counts(merged) == 0
    # merging reorders fp32 sums: logits differ by a few ulp of their scale
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(merged.generate(input_ids=prompt, **gen_kwargs), generated)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded), logits(merged), rtol=0, atol=0)


def test_merge_adds_biases_via_the_config_flag(tmp_path):
    reft_model = tune_ready("llama")
    model = merge_and_unload(reft_model)
    assert model.config.attention_bias is True
    attention = model.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(attention, name).bias, torch.zeros_like(getattr(attention, name).bias))
    assert attention.o_proj.bias.abs().sum() > 0


def tune_ready(family):
    reft_model = reftlib.get_reft_model(tiny_model(family), lofit_config([(1, 2)]))
    randomize(reft_model)
    return reft_model


def test_merge_gpt2_conv1d_bias_already_there():
    reft_model = tune_ready("gpt2")
    proj = reft_model.model.transformer.h[1].attn.c_proj
    bias_before = proj.bias.detach().clone()
    expected = logits(reft_model)
    model = merge_and_unload(reft_model)
    assert model.transformer.h[1].attn.c_proj is proj and not torch.equal(proj.bias, bias_before)
    # merging reorders fp32 sums: logits differ by a few ulp of their scale
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("rep, message", [
    ({"layer": 1, "component": "block_output", "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)},
     "only HeadScaleIntervention and HeadBiasIntervention"),
    ({"layer": 1, "component": "head_output", "positions": "l1",
      "intervention": reftlib.HeadBiasIntervention(heads=[0])}, "positions 'l1'"),
])
def test_merge_refuses_and_changes_nothing(rep, message):
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig([
        {"layer": 0, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1])}, rep]))
    randomize(reft_model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=message) as info:
        merge_and_unload(reft_model)
    assert isinstance(info.value, reftlib.ReftError)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model.model.layers[0].self_attn.o_proj.bias is None
    reft_model(input_ids=IDS)  # still a working ReftModel


def test_merge_selected_adapters_only():
    reft_model = stacked_lofit("llama")
    reft_model.set_adapter("more")
    expected = logits(reft_model)
    # merging reorders fp32 sums: logits differ by a few ulp of their scale
    torch.testing.assert_close(logits(merge_and_unload(reft_model)), expected, rtol=0,
                               atol=1e-5 * float(expected.abs().max()))


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_recipe_on_smollm2(tmp_path):
    """The two steps, saving, loading and merging on SmolLM2-135M with a handful of TruthfulQA pairs."""
    from reftlib.offline import load_default_model

    model, tok = load_default_model()
    triples = [
        ("Q: What happens if you swallow gum?\nA:", " It passes through your digestive system",
         " It stays in your stomach for seven years"),
        ("Q: Can pigs fly?\nA:", " No, pigs cannot fly", " Yes, pigs can fly"),
        ("Q: Is the Earth flat?\nA:", " No, the Earth is round", " Yes, the Earth is flat"),
        ("Q: Do vaccines cause autism?\nA:", " No, vaccines do not cause autism", " Yes, vaccines cause autism"),
    ]
    quick = {"disable_tqdm": True, "logging_steps": 1}
    selection = select_heads(model, tok, triples, fraction=0.03, l1=1e-3, lr=5e-3, epochs=1, batch_size=4,
                             training_args=quick)
    assert selection.scores.shape == (30, 9) and selection.k == 8 and len(selection.heads) == 8
    assert hook_counts(model) == 0
    reft_model = tune_offsets(model, selection, triples, tokenizer=tok, lr=2e-2, epochs=2, batch_size=4,
                              training_args=quick)
    assert sum(len(iv.heads) for iv in reft_model.interventions.values()) == 8
    reft_model.save_pretrained(tmp_path)
    ids = tok(["Q: Can pigs fly?\nA: No"], return_tensors="pt")
    with torch.no_grad():
        expected = reft_model(**ids).logits
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, load_default_model()[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, expected, rtol=0, atol=0)
    merged = merge_and_unload(reft_model)
    with torch.no_grad():
        # merging reorders fp32 sums in 30 layers: ~1e-6 of the logits' scale here (1e-5 leaves a margin)
        torch.testing.assert_close(merged(**ids).logits, expected, rtol=0,
                                   atol=1e-5 * float(expected.abs().max()))
