"""The architecture matrix: every family × every component it has.

For each: the intervention changes the site's representation exactly at the chosen positions,
gradients reach only intervention parameters, greedy generation runs, save → load gives
identical outputs, and detach restores bitwise-identical outputs.
"""

import pytest
import torch
from helpers import capture_site, make_intervention, randomize
from tiny_models import CAUSAL_FAMILIES, FAMILIES, tiny_model

import reftlib

# components each family does not have (fused q/k/v projections)
FUSED_QKV = {"phi3", "gpt2", "gpt_neox", "falcon"}
QKV = ("query_output", "key_output", "value_output")
CASES = [
    (family, component)
    for family in FAMILIES
    for component in reftlib.COMPONENTS
    if not (family in FUSED_QKV and component in QKV)
]

IDS = torch.tensor([[5, 9, 17, 33, 2, 41, 7], [12, 3, 60, 8, 21, 30, 11]])
POSITIONS = [[1, 4], [2, -1]]  # row 1 has one real position and one padding entry


@pytest.mark.parametrize("family,component", CASES)
def test_component_matrix(family, component, tmp_path):
    model = tiny_model(family)
    with torch.no_grad():
        base_logits = model(input_ids=IDS).logits
    config = reftlib.ReftConfig({"layer": 1, "component": component, "intervention": make_intervention(component)})
    reft_model = reftlib.get_reft_model(model, config)
    randomize(reft_model)
    key = next(iter(reft_model.interventions))
    site = reft_model._adapter_sites["default"][key]

    # 1. locality at the site: the tensor differs from the base run exactly at the chosen positions
    store, handle = capture_site(model, site)
    with torch.no_grad():
        model(input_ids=IDS)
        before = store["x"]
        out = reft_model(input_ids=IDS, unit_locations=POSITIONS)
        after = store["x"]
    handle.remove()
    if after.dim() == 2:  # OPT's MLP sees [batch * seq, d]
        before, after = before.view(2, 7, -1), after.view(2, 7, -1)
    changed = (after - before).abs().flatten(2).amax(-1) > 0
    expected = torch.zeros(2, 7, dtype=torch.bool)
    expected[0, [1, 4]] = True
    expected[1, 2] = True
    assert torch.equal(changed, expected), f"{family}/{component}: changed positions {changed.nonzero().tolist()}"
    assert not torch.allclose(out.logits, base_logits)

    # 2. gradients reach only intervention parameters
    reft_model.train()
    out = reft_model(input_ids=IDS, unit_locations=POSITIONS)
    out.logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in reft_model.named_parameters() if p.grad is not None}
    assert grads and all(not n.startswith("model.") for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    reft_model.eval()

    # 3. generation (causal models)
    if family in CAUSAL_FAMILIES:
        generated = reft_model.generate(input_ids=IDS[:1], unit_locations="l1", max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert generated.shape == (1, 10)

    # 4. save -> load onto a fresh copy gives identical outputs
    with torch.no_grad():
        reference = reft_model(input_ids=IDS, unit_locations=POSITIONS).logits
    reft_model.save_pretrained(tmp_path)
    fresh = tiny_model(family)
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, fresh)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS, unit_locations=POSITIONS).logits, reference)

    # 5. detach leaves no hook and restores bitwise-identical outputs
    reft_model.detach()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base_logits)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "falcon"])
def test_fused_qkv_has_clear_error(family):
    model = tiny_model(family)
    with pytest.raises(reftlib.ArchitectureError, match="fuses q, k and v"):
        reftlib.get_reft_model(model, {"layer": 0, "component": "query_output", "low_rank_dimension": 2})


@pytest.mark.parametrize("family", ["gemma", "qwen3", "mistral"])
def test_head_output_shape_uses_head_dim(family):
    """head_dim × heads ≠ hidden_size (Gemma, Qwen3) and grouped-query attention are handled."""
    model = tiny_model(family)
    text = model.config.get_text_config()
    reft_model = reftlib.get_reft_model(model, {"layer": 0, "component": "head_output",
                                                "intervention": reftlib.HeadScaleIntervention()})
    iv = next(iter(reft_model.interventions.values()))
    assert (iv.num_heads, iv.head_dim) == (text.num_attention_heads, text.head_dim)
    assert iv.scale.shape == (text.num_attention_heads, text.head_dim)


def test_explicit_head_dims_are_checked():
    model = tiny_model("gemma")  # 4 heads of 16
    with pytest.raises(reftlib.ReftConfigError, match="head_dim=8"):
        reftlib.get_reft_model(model, {"layer": 0, "component": "head_output",
                                       "intervention": reftlib.HeadBiasIntervention(num_heads=4, head_dim=8)})
    reftlib.get_reft_model(tiny_model("gemma"), {"layer": 0, "component": "head_output",
                                                 "intervention": reftlib.HeadBiasIntervention(num_heads=4, head_dim=16)})


def test_head_bias_changes_only_selected_heads():
    model = tiny_model("llama")
    iv = reftlib.HeadBiasIntervention(heads=[1])
    reft_model = reftlib.get_reft_model(model, {"layer": 1, "component": "head_output", "intervention": iv})
    randomize(reft_model)
    site = reft_model._adapter_sites["default"]["layer_1_head_output"]
    store, handle = capture_site(model, site)
    with torch.no_grad():
        model(input_ids=IDS)
        before = store["x"].unflatten(-1, (4, 8))
        reft_model(input_ids=IDS)  # no positions: every position
        after = store["x"].unflatten(-1, (4, 8))
    handle.remove()
    diff = (after - before).abs().amax(-1)  # [B, T, heads]
    assert (diff[..., 1] > 0).all() and (diff[..., [0, 2, 3]] == 0).all()
    torch.testing.assert_close(after[..., 1, :] - before[..., 1, :], iv.bias[0].expand(2, 7, 8))


def test_module_path_component():
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, [
        {"component": "model.layers.1.mlp", "low_rank_dimension": 2},
        {"component": "model.layers.2.mlp.down_proj:input", "low_rank_dimension": 2},
    ])
    keys = list(reft_model.interventions)
    assert keys == ["model_layers_1_mlp", "model_layers_2_mlp_down_proj_input"]
    # down_proj's input has the MLP's intermediate width
    assert reft_model.interventions[keys[1]].embed_dim == 64
    randomize(reft_model)
    with torch.no_grad():
        assert not torch.allclose(reft_model(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_negative_layer_counts_from_the_end():
    reft_model = reftlib.get_reft_model(tiny_model("llama"), {"layer": -1, "low_rank_dimension": 2})
    assert list(reft_model.interventions) == ["layer_2_block_output"]


def test_component_override_registry():
    from reftlib.components import COMPONENT_OVERRIDES

    model = tiny_model("llama")
    try:
        reftlib.register_component_override("llama", "mlp_output", "mlp.down_proj", "output")
        site = reftlib.resolve_site(model, 0, "mlp_output")
        assert site.path == "model.layers.0.mlp.down_proj"
    finally:
        COMPONENT_OVERRIDES.pop("llama", None)
    assert reftlib.resolve_site(model, 0, "mlp_output").path == "model.layers.0.mlp"


def test_describe_structure_lists_components():
    table = reftlib.describe_structure(tiny_model("bert"))
    assert table["attention_output"] == "bert.encoder.layer.0.attention.output.dense (output)"
    assert table["head_output"] == "bert.encoder.layer.0.attention.output.dense (input)"
    assert table["mlp_input"] == "bert.encoder.layer.0.intermediate (input)"
