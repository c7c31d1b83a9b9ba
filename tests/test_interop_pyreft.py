"""Loading pyreft / pyvene checkpoints (``config.json`` + ``intkey_*.bin``).

The first part writes folders in pyreft's exact on-disk format from synthetic tensors, so the
converter is tested without pyreft installed. The second part (skipped unless ``pyreft`` and
``pyvene`` import) trains nothing but randomizes real pyreft interventions, saves them with
pyreft and checks that reftlib reproduces pyreft's logits and greedy generations.
"""

from __future__ import annotations

import datetime
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import write_pyreft_folder as _write_pyreft_folder
from tiny_models import HIDDEN, tiny_config, tiny_model
from torch import nn

import reftlib
from reftlib import CheckpointError, ReftModel
from reftlib.interop import PYREFT_INTERVENTION_TYPES, convert_pyreft_checkpoint, read_pyreft_folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KINDS = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"]
ROTATED = {"loreft", "direft", "consreft", "lobireft"}
CLASS_NAMES = {v: k.rsplit(".", 1)[1] for k, v in PYREFT_INTERVENTION_TYPES.items()}
RANK = 4


def write_pyreft_folder(folder: Path, entries: list[dict], **kwargs) -> list[str]:
    """:func:`helpers.write_pyreft_folder` with this module's hidden size and rank as defaults."""
    return _write_pyreft_folder(folder, entries, dim=HIDDEN, rank=RANK, **kwargs)


# --------------------------------------------------------------------------- pyreft's format, synthesized
def _rotation_state(d: int, r: int, gen: torch.Generator) -> tuple[OrderedDict, torch.Tensor]:
    """``orthogonal(LowRankRotateLayer(d, r))``'s state dict, as pyreft's non-LoReFT classes save it."""
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.empty(d, r))
    nn.init.orthogonal_(layer.weight)
    nn.utils.parametrizations.orthogonal(layer)
    with torch.no_grad():  # move away from the initial point so R = base @ Q(original) is non-trivial
        layer.parametrizations.weight.original.add_(_trainable_part(torch.randn(d, r, generator=gen) * 0.3, "original"))
        rotation = layer.weight.detach().clone()
    state = OrderedDict((f"rotate_layer.{k}", v.detach().clone()) for k, v in layer.state_dict().items())
    return state, rotation


def _trainable_part(noise: torch.Tensor, name: str) -> torch.Tensor:
    """Noise restricted to what training can change: torch's Householder map reads only the strictly
    lower triangle of ``original`` (its diagonal holds fixed signs)."""
    return noise.tril(-1) if name.endswith("original") else noise


def pyreft_state(kind: str, d: int = HIDDEN, r: int = RANK, seed: int = 0, add_bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> tuple[OrderedDict, dict[str, torch.Tensor]]:
    """``(state dict exactly as pyreft saves it, reference tensors for the formula)``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(dtype)

    buffers = OrderedDict(embed_dim=torch.tensor(d), interchange_dim=torch.tensor(d))
    ref: dict[str, torch.Tensor] = {}
    if kind == "loreft":  # LoreftIntervention.state_dict(): learned_source's weight/bias + R itself
        _, rotation = _rotation_state(d, r, gen)
        ref = {"W": randn(r, d), "b": randn(r), "R": rotation}
        state = OrderedDict(weight=ref["W"], bias=ref["b"], rotate_layer=rotation)
    elif kind in ("direft", "consreft", "lobireft"):
        rot_state, rotation = _rotation_state(d, r, gen)
        ref["R"] = rotation
        if kind == "direft":
            ref |= {"W": randn(r, d), "b": randn(r)}
            state = OrderedDict(**buffers, **rot_state)
            state["learned_source.weight"], state["learned_source.bias"] = ref["W"], ref["b"]
        else:
            ref["s"] = randn(r)
            state = OrderedDict(learned_source=ref["s"], **buffers, **rot_state)
    else:  # noreft / nodireft: default state dicts
        ref = {"P": randn(r, d), "W": randn(r, d), "b": randn(r)}
        state = OrderedDict(**buffers)
        state["proj_layer.weight"] = ref["P"]
        if add_bias:
            ref["c"] = randn(r)
            state["proj_layer.bias"] = ref["c"]
        state["learned_source.weight"], state["learned_source.bias"] = ref["W"], ref["b"]
    return state, {k: v.float() for k, v in ref.items()}


def pyreft_formula(kind: str, ref: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """pyreft's forward of each class (copied from pyreft/interventions.py), linear activation."""
    if kind == "loreft":
        return x + ((x @ ref["W"].T + ref["b"]) - x @ ref["R"]) @ ref["R"].T
    if kind == "noreft":
        proj = x @ ref["P"].T + ref.get("c", 0.0)
        return x + ((x @ ref["W"].T + ref["b"]) - proj) @ ref["P"]
    if kind == "direft":
        return x + (x @ ref["W"].T + ref["b"]) @ ref["R"].T
    if kind == "nodireft":
        return x + (x @ ref["W"].T + ref["b"]) @ ref["P"]
    if kind == "consreft":
        return x + (ref["s"] - x @ ref["R"]) @ ref["R"].T
    return x + ref["s"] @ ref["R"].T  # lobireft


def reference_logits(model, edits: list[tuple[nn.Module, str, callable, list[list[int]]]], ids: torch.Tensor):
    """Logits of ``model`` with ``fn`` applied at ``positions`` of each ``(module, 'input'|'output')`` site."""
    handles = []
    for module, kind, fn, positions in edits:
        def edit(h, fn=fn, positions=positions):
            h = h.clone()
            for row, pos in enumerate(positions):
                h[row, pos] = fn(h[row, pos])
            return h

        if kind == "output":
            def hook(mod, args, out, edit=edit):
                return edit(out) if isinstance(out, torch.Tensor) else (edit(out[0]), *out[1:])
            handles.append(module.register_forward_hook(hook))
        else:
            def pre(mod, args, edit=edit):
                return (edit(args[0]), *args[1:])
            handles.append(module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for handle in handles:
            handle.remove()


IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 12], [8, 1, 99, 23, 64, 30, 2]])


def _logits(reft_model: ReftModel, positions: list) -> torch.Tensor:
    with torch.no_grad():
        return reft_model(input_ids=IDS, attention_mask=torch.ones_like(IDS),
                          unit_locations={"sources->base": (None, positions)}).logits


# --------------------------------------------------------------------------- always-run tests
@pytest.mark.parametrize("kind", KINDS)
def test_each_pyreft_class_matches_pyreft_formula(tmp_path, kind):
    state, ref = pyreft_state(kind)
    write_pyreft_folder(tmp_path, [{"class": CLASS_NAMES[kind], "state": state}])
    reft_model = ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    rep = reft_model.reft_config.representations[0]
    assert rep.name == "layer_1_comp_block_output_unit_pos_nunit_1#0"
    iv = rep.intervention
    assert (iv.type_name, iv.config["low_rank_dimension"], iv.embed_dim) == (kind, RANK, HIDDEN)
    if kind in ("noreft", "nodireft"):
        assert iv.config["add_bias"] is True
    if kind in ROTATED:  # reftlib's R (rows) is pyreft's R (columns), orthonormalization changes nothing
        torch.testing.assert_close(iv.rotate_layer.weight, ref["R"].T, atol=1e-6, rtol=0)
    positions = [[[1, 6], [0, 3]]]
    got = _logits(reft_model, positions)
    fresh = tiny_model("llama")
    want = reference_logits(fresh, [(fresh.model.layers[1], "output", lambda x: pyreft_formula(kind, ref, x),
                                     positions[0])], IDS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    base = tiny_model("llama")(input_ids=IDS).logits
    assert (got - base).abs().max() > 1e-3  # the intervention is visible


def test_legacy_pyvene_keys_two_interventions_in_order(tmp_path):
    """pyvene ≤ 0.1.6 (dotted keys, 13 representation fields); positions follow the config order."""
    s0, r0 = pyreft_state("loreft", seed=1)
    s2, r2 = pyreft_state("noreft", seed=2, add_bias=False)
    keys = write_pyreft_folder(tmp_path, [
        {"class": "LoreftIntervention", "state": s0, "layer": 2},
        {"class": "NoreftIntervention", "state": s2, "layer": 0},
    ], legacy=True)
    assert keys[0] == "layer.2.comp.block_output.unit.pos.nunit.1#0"
    config, tensors = read_pyreft_folder(tmp_path)
    names = [rep["name"] for rep in config["representations"]]
    assert names == ["layer_2_comp_block_output_unit_pos_nunit_1#0", "layer_0_comp_block_output_unit_pos_nunit_1#0"]
    assert config["representations"][1]["intervention"]["add_bias"] is False
    assert f"{names[1]}.proj_layer.bias" not in tensors
    reft_model = ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    positions = [[[6], [2]], [[0, 1], [4, 5]]]
    fresh = tiny_model("llama")
    want = reference_logits(fresh, [
        (fresh.model.layers[2], "output", lambda x: pyreft_formula("loreft", r0, x), positions[0]),
        (fresh.model.layers[0], "output", lambda x: pyreft_formula("noreft", r2, x), positions[1]),
    ], IDS)
    torch.testing.assert_close(_logits(reft_model, positions), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hook_kind", ["output", "input"])
def test_module_path_component(tmp_path, hook_kind):
    state, ref = pyreft_state("direft", seed=3)
    write_pyreft_folder(tmp_path, [{"class": "DireftIntervention", "state": state, "layer": 0,
                                    "component": f"model.layers.1.mlp.{hook_kind}"}])
    config, _ = read_pyreft_folder(tmp_path)
    rep = config["representations"][0]
    assert (rep["component"], rep["layer"]) == (f"model.layers.1.mlp:{hook_kind}", None)
    assert rep["name"] == f"comp_model_layers_1_mlp_{hook_kind}_unit_pos_nunit_1#0"
    reft_model = ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    positions = [[[2, 4], [5]]]
    positions_padded = [[[2, 4], [5, -1]]]
    fresh = tiny_model("llama")
    want = reference_logits(fresh, [(fresh.model.layers[1].mlp, hook_kind, lambda x: pyreft_formula("direft", ref, x),
                                     positions[0])], IDS)
    torch.testing.assert_close(_logits(reft_model, positions_padded), want, atol=1e-5, rtol=1e-5)


def test_without_sorted_keys_bf16_weights_and_options(tmp_path):
    state, _ = pyreft_state("loreft", dtype=torch.bfloat16)
    state["rotate_layer"] = state["rotate_layer"].float()  # pyreft keeps R in fp32 and learned_source in bf16
    write_pyreft_folder(tmp_path, [{"class": "LoreftIntervention", "state": state}], sorted_keys=False)
    config, tensors = read_pyreft_folder(tmp_path)  # float32 by default: bf16 weights are upcast exactly
    assert config["representations"][0]["intervention"]["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in tensors.values())
    name = config["representations"][0]["name"]
    assert torch.equal(tensors[f"{name}.learned_source.weight"], state["weight"].float())
    config16, tensors16 = read_pyreft_folder(tmp_path, dtype="bfloat16", act_fn="relu")
    assert config16["representations"][0]["intervention"]["act_fn"] == "relu"
    assert config16["representations"][0]["intervention"]["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in tensors16.values())
    with pytest.raises(CheckpointError, match="act_fn"):
        read_pyreft_folder(tmp_path, act_fn="nope")
    converted = convert_pyreft_checkpoint(tmp_path, tmp_path / "bf16", dtype=torch.bfloat16)
    reft_model = ReftModel.from_pretrained(converted, tiny_model("llama"))
    assert next(iter(reft_model.interventions.values())).learned_source.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(reft_model, [[[6], [6]]])).all()


def test_convert_pyreft_checkpoint(tmp_path):
    state, _ = pyreft_state("consreft", seed=4)
    src = tmp_path / "pyreft"
    write_pyreft_folder(src, [{"class": "ConsreftIntervention", "state": state}])
    direct = _logits(ReftModel.from_pretrained(src, tiny_model("llama")), [[[3], [4]]])

    plain = convert_pyreft_checkpoint(src, tmp_path / "plain")
    assert (plain / "reft_model.safetensors").exists() and (plain / "reft_config.json").exists()
    torch.testing.assert_close(_logits(ReftModel.from_pretrained(plain, tiny_model("llama")), [[[3], [4]]]), direct)

    model = tiny_model("llama")
    for param in model.lm_head.parameters():
        param.requires_grad_(True)
    flags = [p.requires_grad for p in model.parameters()]
    checked = convert_pyreft_checkpoint(src, tmp_path / "checked", model)
    assert [p.requires_grad for p in model.parameters()] == flags
    torch.testing.assert_close(model(input_ids=IDS).logits, tiny_model("llama")(input_ids=IDS).logits)  # no hooks left
    saved = json.loads((checked / "reft_config.json").read_text())
    assert saved["base_model_type"] == "llama"
    torch.testing.assert_close(_logits(ReftModel.from_pretrained(checked, tiny_model("llama")), [[[3], [4]]]), direct)


def test_convert_records_training_positions_and_serving_needs_them(tmp_path):
    """pyreft does not save positions: a converted folder may record them; serving takes a raw pyreft
    folder only with the positions given (else it would act on every position), and then builds
    exactly what the converted folder gives."""
    from reftlib.errors import AdapterError, PositionError
    from reftlib.serving.adapters import load_served_adapter, load_served_adapters

    state, _ = pyreft_state("loreft", seed=2)
    src = tmp_path / "pyreft"
    write_pyreft_folder(src, [{"class": "LoreftIntervention", "state": state}])
    config = tiny_config("llama").to_dict()
    with pytest.raises(AdapterError, match=r"pyreft_positions=\{'emoji': 'f1\+l1'\}.*--pyreft-positions emoji=f1\+l1.*"
                                           r"convert_pyreft_checkpoint\(src, dst, positions="):
        load_served_adapter("emoji", src, config)
    with pytest.raises(PositionError):
        convert_pyreft_checkpoint(src, tmp_path / "bad", positions="f1+q")
    with pytest.raises(AdapterError, match=r"pyreft positions 'f1\+q'"):
        load_served_adapter("emoji", src, config, pyreft_positions="f1+q")
    converted = convert_pyreft_checkpoint(src, tmp_path / "converted", positions="f1+l1")
    served = load_served_adapter("emoji", converted, config)
    assert [spec for _, spec in served.positions] == ["f1+l1"] and served.prompt_length_matters
    assert served.source == (str(converted), None)
    reft_model = ReftModel.from_pretrained(converted, tiny_model("llama"))
    assert [rep.positions for rep in reft_model.reft_configs["default"].representations] == ["f1+l1"]

    direct = load_served_adapter("emoji", src, config, pyreft_positions="f1+l1")
    assert direct.positions == served.positions and direct.source == (str(src), "f1+l1")
    for a, b in zip(direct.interventions, served.interventions, strict=True):
        assert (a.key, a.layer, a.component) == (b.key, b.layer, b.component)
        assert type(a.intervention) is type(b.intervention)
        for (name_a, ta), (name_b, tb) in zip(a.intervention.state_dict().items(), b.intervention.state_dict().items(),
                                              strict=True):
            assert name_a == name_b and torch.equal(ta, tb)
    with pytest.raises(AdapterError, match=r"records its own positions"):
        load_served_adapter("emoji", converted, config, pyreft_positions="l1")
    with pytest.raises(AdapterError, match=r"\['other'\], which are not among the adapters \['emoji'\]"):
        load_served_adapters({"emoji": src}, config, {"other": "l1"})
    assert load_served_adapters({"emoji": src}, config, {"emoji": "f1+l1"})["emoji"].positions == served.positions


# --------------------------------------------------------------------------- errors
def test_unknown_class_is_named(tmp_path):
    state, _ = pyreft_state("loreft")
    write_pyreft_folder(tmp_path, [{"class": "LowRankRotatedSpaceIntervention", "module": "pyvene.models.interventions",
                                    "state": state}])
    with pytest.raises(CheckpointError, match=r"LowRankRotatedSpaceIntervention.*LoreftIntervention"):
        ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    write_pyreft_folder(tmp_path, [{"class": "LoreftIntervention", "module": "__main__", "state": state}])
    with pytest.raises(CheckpointError, match=r"__main__\.LoreftIntervention"):
        read_pyreft_folder(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json"):
        read_pyreft_folder(tmp_path)
    s0, _ = pyreft_state("loreft")
    keys = write_pyreft_folder(tmp_path, [{"class": "LoreftIntervention", "state": s0, "layer": 0},
                                          {"class": "LoreftIntervention", "state": s0, "layer": 1}])
    (tmp_path / f"intkey_{keys[1]}.bin").unlink()
    with pytest.raises(CheckpointError, match=r"missing.*layer_1_comp"):
        ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["sorted_keys"][1] = "../../elsewhere#0"  # keys only ever name files inside the folder
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a valid file-name part"):
        read_pyreft_folder(tmp_path)


def test_corrupted_files(tmp_path):
    state, _ = pyreft_state("noreft")
    (key,) = write_pyreft_folder(tmp_path, [{"class": "NoreftIntervention", "state": state}])
    path = tmp_path / f"intkey_{key}.bin"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    torch.save({"proj_layer.weight": datetime.date(2024, 1, 1)}, path)  # not a tensor: never unpickled
    with pytest.raises(CheckpointError, match="other than tensors"):
        read_pyreft_folder(tmp_path)
    torch.save(OrderedDict(weight=torch.zeros(3)), path)  # tensors, but not a NoReFT state dict
    with pytest.raises(CheckpointError, match=r"proj_layer\.weight"):
        read_pyreft_folder(tmp_path)
    bad = OrderedDict(state)
    bad["learned_source.bias"] = torch.zeros(RANK + 1)
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match=r"shape \(5,\)"):
        read_pyreft_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"representations": [[1, "block_output"')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_pyreft_folder(tmp_path)


def test_unconvertible_sites_and_mismatched_model(tmp_path):
    state, _ = pyreft_state("loreft")
    write_pyreft_folder(tmp_path / "act", [{"class": "LoreftIntervention", "state": state, "component": "mlp_activation"}])
    with pytest.raises(CheckpointError, match="mlp_activation"):
        read_pyreft_folder(tmp_path / "act")
    write_pyreft_folder(tmp_path / "head", [{"class": "LoreftIntervention", "state": state, "unit": "h.pos"}])
    with pytest.raises(CheckpointError, match=r"h\.pos"):
        read_pyreft_folder(tmp_path / "head")
    write_pyreft_folder(tmp_path / "dims", [{"class": "LoreftIntervention", "state": state, "dim": 64}])
    with pytest.raises(CheckpointError, match="intervention_dimensions=64"):
        read_pyreft_folder(tmp_path / "dims")
    narrow, _ = pyreft_state("loreft", d=16)
    write_pyreft_folder(tmp_path / "narrow", [{"class": "LoreftIntervention", "state": narrow, "dim": 16}])
    with pytest.raises(CheckpointError, match="do not fit this model"):
        ReftModel.from_pretrained(tmp_path / "narrow", tiny_model("llama"))


# --------------------------------------------------------------------------- against real pyreft
@pytest.fixture(scope="module")
def pyreft():
    """pyreft + pyvene, stubbing matplotlib only if it is missing (pyvene imports it, ReFT never uses it).

    The stub is removed again once pyvene is imported, so other tests still see matplotlib as missing.
    """
    stubs = {}
    try:
        import matplotlib.pyplot  # noqa: F401
    except ModuleNotFoundError:
        stubs["matplotlib"] = types.ModuleType("matplotlib")
        stubs["matplotlib.pyplot"] = stubs["matplotlib"].pyplot = types.ModuleType("matplotlib.pyplot")
        for name, module in stubs.items():
            sys.modules.setdefault(name, module)
    try:
        pytest.importorskip("pyvene")
        return pytest.importorskip("pyreft")
    finally:
        for name, module in stubs.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


PYREFT_POSITIONS = [[[1, 6], [0, 3]]]


@pytest.mark.parametrize("kind", KINDS)
def test_real_pyreft_checkpoint_matches_pyreft(pyreft, tmp_path, kind):
    torch.manual_seed(0)
    cls = getattr(pyreft, CLASS_NAMES[kind])
    intervention = cls(embed_dim=HIDDEN, low_rank_dimension=RANK, dtype=torch.float32, add_bias=True)
    config = pyreft.ReftConfig(representations={"layer": 1, "component": "block_output",
                                                "low_rank_dimension": RANK, "intervention": intervention})
    pyreft_model = pyreft.get_reft_model(tiny_model("llama"), config, set_device=False)
    pyreft_model.use_fast = False
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in intervention.named_parameters():
            param.add_(_trainable_part(torch.randn(param.shape, generator=generator) * 0.5, name))
    intervention.eval()
    inputs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    with torch.no_grad():
        _, want = pyreft_model(inputs, unit_locations={"sources->base": (None, PYREFT_POSITIONS)})
    pyreft_model.save(save_directory=str(tmp_path))

    reft_model = ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    iv = next(iter(reft_model.interventions.values()))
    assert iv.type_name == kind
    torch.testing.assert_close(_logits(reft_model, PYREFT_POSITIONS), want.logits, atol=1e-5, rtol=1e-5)
    # the pyreft-style call returns (original, intervened) like pyreft
    _, again = reft_model(inputs, unit_locations={"sources->base": (None, PYREFT_POSITIONS)})
    torch.testing.assert_close(again.logits, want.logits, atol=1e-5, rtol=1e-5)

    prompt = IDS[:, :5]
    generate_kwargs = dict(unit_locations={"sources->base": (None, [[[4], [4]]])}, intervene_on_prompt=True,
                           max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompt_inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    _, pyreft_generated = pyreft_model.generate(prompt_inputs, **generate_kwargs)
    _, generated = reft_model.generate(prompt_inputs, **generate_kwargs)
    assert torch.equal(generated, pyreft_generated)
    with torch.no_grad():
        base_logits = tiny_model("llama")(**inputs).logits
    assert (want.logits - base_logits).abs().max() > 1e-3  # the intervention is visible


def test_real_pyreft_two_interventions_and_conversion(pyreft, tmp_path):
    torch.manual_seed(0)
    loreft = pyreft.LoreftIntervention(embed_dim=HIDDEN, low_rank_dimension=2, dtype=torch.float32)
    direft = pyreft.DireftIntervention(embed_dim=HIDDEN, low_rank_dimension=RANK, dtype=torch.float32)
    config = pyreft.ReftConfig(representations=[
        {"layer": 2, "component": "block_output", "low_rank_dimension": 2, "intervention": loreft},
        {"layer": 0, "component": "mlp_output", "low_rank_dimension": RANK, "intervention": direft},
    ])
    pyreft_model = pyreft.get_reft_model(tiny_model("llama"), config, set_device=False)
    pyreft_model.use_fast = False
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for iv in (loreft, direft):
            for name, param in iv.named_parameters():
                param.add_(_trainable_part(torch.randn(param.shape, generator=generator) * 0.5, name))
            iv.eval()
    positions = [[[6], [5]], [[0, 2], [1, 3]]]
    with torch.no_grad():
        _, want = pyreft_model({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)},
                               unit_locations={"sources->base": (None, positions)})
    pyreft_model.save(save_directory=str(tmp_path / "pyreft"))
    converted = convert_pyreft_checkpoint(tmp_path / "pyreft", tmp_path / "reftlib", tiny_model("llama"))
    reft_model = reftlib.ReftModel.from_pretrained(converted, tiny_model("llama"))
    assert [r.component for r in reft_model.reft_config.representations] == ["block_output", "mlp_output"]
    torch.testing.assert_close(_logits(reft_model, positions), want.logits, atol=1e-5, rtol=1e-5)
