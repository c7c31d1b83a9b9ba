"""The trainers skip the frozen layers below the interventions on examples they have seen (PrefixCache)."""

from __future__ import annotations

import pytest
import torch
from test_training import OUTPUTS, PROMPTS, args, assert_states_close, base_lm, intervention_state
from tiny_models import CAUSAL_FAMILIES, tiny_model
from tiny_tokenizer import tiny_tokenizer

import reftlib
from reftlib.components import find_layers
from reftlib.errors import ReftConfigError
from reftlib.training import ReftTrainerForCausalLM, make_multiple_position_supervised_data_module
from reftlib.training.prefix_cache import PrefixCache, _row_keys, _skipping


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama")


def reft_at(model, *sites, rank=4, seed=7):
    """A ReftModel with one LoReFT per ``(layer, component)``."""
    torch.manual_seed(seed)
    reps = [{"layer": layer, "component": component, "intervention": reftlib.LoreftIntervention(low_rank_dimension=rank)}
            for layer, component in sites]
    return reftlib.get_reft_model(model, reftlib.ReftConfig(representations=reps))


def train(tok, reft_model, tmp_path, prefix_cache, steps=12, padding_side="right", prefix_cache_max_bytes=2**30,
          **overrides):
    """12 steps of batch 3 over 8 examples of different lengths (shuffled, padded per batch): 4 epochs."""
    module = make_multiple_position_supervised_data_module(
        tok, reft_model, PROMPTS, OUTPUTS, positions="f2+l2", num_interventions=len(reft_model.interventions),
        share_weights=True, padding_side=padding_side,
    )
    trainer = ReftTrainerForCausalLM(
        model=reft_model, tokenizer=tok, prefix_cache=prefix_cache, prefix_cache_max_bytes=prefix_cache_max_bytes,
        args=args(tmp_path, max_steps=steps, per_device_train_batch_size=3, **overrides), **module,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, intervention_state(reft_model)


def no_instance_forward(model):
    _, layers = find_layers(model)
    return all("forward" not in layer.__dict__ for layer in layers)


@pytest.mark.parametrize(
    ("component", "padding_side", "checkpointing"),
    [("block_output", "right", False), ("attention_output", "right", False), ("block_output", "left", False),
     ("block_output", "right", True)],
)
def test_cached_training_equals_uncached(tok, tmp_path, component, padding_side, checkpointing):
    runs = {}
    for cache in (False, "auto"):
        reft_model = reft_at(base_lm(), (1, component), (2, "block_output"))
        runs[cache] = train(tok, reft_model, tmp_path, cache, padding_side=padding_side,
                            gradient_checkpointing=checkpointing)
        assert no_instance_forward(reft_model.model)
    trainer, losses, state = runs["auto"]
    cache = trainer.prefix_cache
    assert cache.disabled is None
    if padding_side == "right":  # 3 batches per epoch are new, later ones replay whatever their padded length
        assert cache.misses >= 3 and cache.hits >= 6, cache
        assert len(cache.rows) == len(PROMPTS)
    else:  # left padding moves a row's tokens with the batch's length: it hits only at the same offset
        assert cache.misses + cache.hits == 12 and len(cache.rows) >= len(PROMPTS), cache
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs[False][1]), atol=1e-5, rtol=1e-5)
    assert_states_close(state, runs[False][2], atol=1e-5)


def test_boundary_is_the_lowest_intervened_layer():
    boundary = PrefixCache()._boundary
    assert boundary(reft_at(base_lm(), (2, "block_output")))[1] == 3  # layer 2 too: the hook edits its output
    assert boundary(reft_at(base_lm(), (2, "attention_output")))[1] == 2
    assert boundary(reft_at(base_lm(), (2, "block_input")))[1] == 2
    assert boundary(reft_at(base_lm(), (2, "block_output"), (1, "mlp_output")))[1] == 1
    assert boundary(reft_at(base_lm(), (1, "block_output"), (1, "mlp_output")))[1] == 1
    assert boundary(reft_at(base_lm(), (0, "attention_input")))[1] == 0


def test_the_replayed_layers_skip_their_computation(tok, tmp_path):
    """After the first epoch the layers below the boundary are called (hooks run) but compute nothing."""
    reft_model = reft_at(base_lm(), (2, "attention_output"))
    computed = []
    _, layers = find_layers(reft_model.model)
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: computed.append(i)) for i, layer in enumerate(layers)]
    try:
        trainer, _, _ = train(tok, reft_model, tmp_path, "auto", steps=6)
    finally:
        for handle in handles:
            handle.remove()
    assert trainer.prefix_cache.hits == 3 and trainer.prefix_cache.misses == 3
    # 6 steps run layer 2's MLP, only the 3 first-epoch steps run layers 0 and 1
    assert computed.count(2) == 6 and computed.count(0) == 3 and computed.count(1) == 3


def test_dropout_in_the_prefix_turns_the_cache_off(tok, tmp_path):
    def gpt2():
        model = tiny_model("gpt2")
        model.config.pad_token_id = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
        return model

    gpt_tok = tiny_tokenizer("gpt2")
    trainer, losses, state = train(gpt_tok, reft_at(gpt2(), (2, "block_output")), tmp_path, "auto")
    assert "random" in trainer.prefix_cache.disabled and trainer.prefix_cache.hits == 0
    _, plain_losses, plain_state = train(gpt_tok, reft_at(gpt2(), (2, "block_output")), tmp_path, False)
    assert losses == plain_losses  # same dropout draws: the cache changed nothing
    assert_states_close(state, plain_state, atol=0)
    with pytest.raises(ReftConfigError, match="random numbers"):
        train(gpt_tok, reft_at(gpt2(), (2, "block_output")), tmp_path, True)


def test_trainable_layers_below_the_interventions_turn_the_cache_off(tok, tmp_path):
    model = base_lm()
    reft_model = reft_at(model, (2, "block_output"))
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # e.g. LoRA on a lower layer
    trainer, _, _ = train(tok, reft_model, tmp_path, "auto", steps=6)
    assert "must be frozen" in trainer.prefix_cache.disabled and trainer.prefix_cache.hits == 0
    model = base_lm()
    reft_model = reft_at(model, (2, "block_output"))
    model.model.embed_tokens.weight.requires_grad_(True)  # trained embeddings: outside the layer list
    with pytest.raises(ReftConfigError, match="embed_tokens|Embedding"):
        train(tok, reft_model, tmp_path, True, steps=6)


def test_cap_and_bypassed_inputs(tok, tmp_path):
    _, losses, state = train(tok, reft_at(base_lm(), (2, "block_output")), tmp_path, False)
    trainer, capped_losses, capped_state = train(tok, reft_at(base_lm(), (2, "block_output")), tmp_path, "auto",
                                                 prefix_cache_max_bytes=1)
    assert trainer.prefix_cache.rows == {} and trainer.prefix_cache.hits == 0  # nothing fits: every step runs
    torch.testing.assert_close(torch.tensor(capped_losses), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    assert_states_close(capped_state, state, atol=1e-5)

    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    mask = (ids != 0).long()
    keys, spans = _row_keys({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert spans == [(0, 3), (0, 2)]
    same, _ = _row_keys({"input_ids": ids[:, :3], "attention_mask": mask[:, :3]})
    assert same == keys  # right padding: the key does not depend on the batch's padded length
    assert _row_keys({"input_ids": ids, "inputs_embeds": torch.zeros(2, 4, 8)}) is None
    assert _row_keys({"input_ids": ids, "output_hidden_states": True}) is None
    assert _row_keys({"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]])}) is None
    assert _row_keys({"input_ids": ids, "attention_mask": torch.ones(2, 1, 4, 4)}) is None


def test_skipping_restores_forward_methods_installed_on_instances():
    model = base_lm()
    _, layers = find_layers(model)
    original = layers[0].forward

    def wrapped(*a, **k):  # what accelerate's offloading hooks install
        return original(*a, **k)

    layers[0].forward = wrapped
    with pytest.raises(RuntimeError, match="boom"), _skipping(layers[:2], "replayed"):
        assert layers[0].forward() == "replayed" and layers[1].forward() == "replayed"
        raise RuntimeError("boom")
    assert layers[0].__dict__["forward"] is wrapped
    assert "forward" not in layers[1].__dict__


def test_prefix_cache_argument_is_validated(tok, tmp_path):
    reft_model = reft_at(base_lm(), (2, "block_output"))
    with pytest.raises(ReftConfigError, match="prefix_cache"):
        ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, prefix_cache="yes", args=args(tmp_path))
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tok, prefix_cache=False, args=args(tmp_path))
    assert trainer.prefix_cache is None


def test_only_rebuildable_layer_outputs_are_cached():
    from reftlib.training.prefix_cache import PrefixUnavailable, _template

    hidden = torch.zeros(2, 5, 8)
    assert _template(hidden, [(), ()], 5)[1] is hidden
    assert _template((hidden, None), [(), ()], 5)[0][-1] == (None,)
    with pytest.raises(PrefixUnavailable, match="more than hidden states"):
        _template((hidden, torch.zeros(2, 4, 5, 5)), [(), ()], 5)  # e.g. T5's position bias
    with pytest.raises(PrefixUnavailable, match=r"\[batch, seq, hidden\]"):
        _template(hidden.transpose(0, 1), [(), ()], 5)  # sequence-first layouts


def without_dropout(model):
    """Dropout probabilities set to 0 (modules and float attributes), so training steps draw no random numbers."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


#: Families whose decoder layers return ``(hidden, attention weights)`` even when nobody asked for the weights.
RETURNS_ATTENTION_WEIGHTS = {"falcon"}


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_cached_training_equals_uncached_on_every_architecture(family, tmp_path):
    """Every causal family: the cache replays the frozen layers (hits) and training is unchanged."""
    family_tok = tiny_tokenizer("gpt2" if family in ("gpt2", "gptj", "gpt_neox", "opt", "falcon") else "llama")

    def model():
        base = without_dropout(tiny_model(family))
        if base.config.pad_token_id is None:
            base.config.pad_token_id = 0
        return base

    runs = {cache: train(family_tok, reft_at(model(), (1, "block_output"), (2, "attention_output")), tmp_path, cache,
                         steps=9)
            for cache in (False, "auto")}
    trainer, losses, state = runs["auto"]
    if family in RETURNS_ATTENTION_WEIGHTS:  # an extra tensor the cache cannot rebuild: every step runs the model
        assert "more than hidden states" in trainer.prefix_cache.disabled and trainer.prefix_cache.hits == 0
    else:
        assert trainer.prefix_cache.disabled is None, trainer.prefix_cache.disabled
        assert trainer.prefix_cache.hits >= 5, trainer.prefix_cache
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs[False][1]), atol=1e-5, rtol=1e-5)
    assert_states_close(state, runs[False][2], atol=1e-5)
