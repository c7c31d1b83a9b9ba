"""save_pretrained / from_pretrained: safetensors + JSON, atomic, checked, Hub cache, push_to_hub."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import randomize
from tiny_models import tiny_model

import reftlib
from reftlib import io as reft_io

IDS = torch.tensor([[5, 9, 17, 33, 2, 41, 7]])


def _trained(family="llama", **rep):
    model = tiny_model(family)
    reps = rep.pop("reps", None) or [
        {"layer": 1, "component": "block_output", "intervention": reftlib.LoreftIntervention(low_rank_dimension=3, act_fn="gelu"), "positions": "l1"},
        {"layer": 2, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1, 3])},
        {"layer": 0, "component": "mlp_output", "intervention": reftlib.NoreftIntervention(low_rank_dimension=2, add_bias=True, dtype="bfloat16")},
    ]
    reft_model = reftlib.get_reft_model(model, reps)
    randomize(reft_model)
    return reft_model


def _logits(reft_model):
    with torch.no_grad():
        return reft_model(input_ids=IDS).logits


def test_roundtrip_identical_outputs_and_config(tmp_path):
    reft_model = _trained()
    reference = _logits(reft_model)
    reft_model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["reft_config.json", "reft_model.safetensors"]
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), reference)
    saved = json.loads((tmp_path / "reft_config.json").read_text())
    assert saved["format"] == "reftlib" and saved["format_version"] == 2
    first = saved["representations"][0]
    assert first["intervention"] == {
        "type": "loreft", "embed_dim": 32, "dtype": "float32", "dropout": 0.0, "low_rank_dimension": 3, "act_fn": "gelu"
    }
    assert first["positions"] == "l1" and first["layer"] == 1 and first["component"] == "block_output"
    assert saved["representations"][1]["intervention"]["heads"] == [1, 3]
    assert saved["representations"][2]["intervention"]["dtype"] == "bfloat16"
    # dtype restored: the bf16 intervention is bf16 again, fp32 ones fp32
    ivs = loaded.interventions
    assert ivs["layer_0_mlp_output"].proj_layer.weight.dtype == torch.bfloat16
    assert ivs["layer_1_block_output"].learned_source.weight.dtype == torch.float32
    assert not loaded.training and not any(p.requires_grad for p in loaded.adapters.parameters())
    trainable = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"), is_trainable=True)
    assert all(p.requires_grad for p in trainable.adapters.parameters())


def test_rotation_stays_orthonormal_after_load(tmp_path):
    reft_model = _trained()
    reft_model.save_pretrained(tmp_path)
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    rot = loaded.interventions["layer_1_block_output"].rotate_layer.weight
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), atol=1e-5, rtol=0)


def test_no_square_matrix_in_the_file(tmp_path):
    reft_model = _trained()
    reft_model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "reft_model.safetensors"), "pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert shapes["layer_1_block_output.rotate_layer.raw"] == (32, 3)
    assert all(s != (32, 32) for s in shapes.values())


def test_safetensors_alone_is_enough(tmp_path):
    reft_model = _trained()
    reft_model.save_pretrained(tmp_path)
    (tmp_path / "reft_config.json").unlink()
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(reft_model))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _trained()
    first.save_pretrained(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    second = _trained()
    with torch.no_grad():
        for p in second.adapters.parameters():
            p.mul_(3)
    real_replace = os.replace

    def crash(src, dst):  # the process dies while the new weights are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(reft_io.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.setattr(reft_io.os, "replace", real_replace)
    after = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files left, old files intact
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(first))


def test_crash_between_weights_and_json_is_still_consistent(tmp_path, monkeypatch):
    first = _trained()
    first.save_pretrained(tmp_path)
    second = _trained()
    with torch.no_grad():
        for p in second.adapters.parameters():
            p.mul_(3)
    real = reft_io.atomic_write_bytes

    def write(path, data):
        if path.name == "reft_config.json":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(reft_io, "atomic_write_bytes", write)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(second))


def test_other_files_in_the_folder_are_untouched(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    _trained().save_pretrained(tmp_path)
    assert (tmp_path / "trainer_state.json").read_text() == "{}"


def test_truncated_and_corrupted_files(tmp_path):
    _trained().save_pretrained(tmp_path)
    weights = tmp_path / "reft_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(reftlib.CheckpointError, match="truncated or corrupted"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(reftlib.CheckpointError, match="truncated or corrupted"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def _rewrite_config(tmp_path, mutate):
    """Rewrite the config in both places (JSON and safetensors metadata)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((tmp_path / "reft_config.json").read_text())
    mutate(config)
    text = json.dumps(config)
    tensors = load_file(str(tmp_path / "reft_model.safetensors"))
    save_file(tensors, str(tmp_path / "reft_model.safetensors"), metadata={"format": "pt", "reftlib_config": text})
    (tmp_path / "reft_config.json").write_text(text)


def test_unknown_intervention_class_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c["representations"][0]["intervention"].update(type="os.system"))
    with pytest.raises(reftlib.CheckpointError, match="unknown intervention type 'os.system'"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def test_newer_format_version_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda c: c.update(format_version=99))
    with pytest.raises(reftlib.CheckpointError, match="newer reftlib"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def test_loading_onto_a_model_of_another_size(tmp_path):
    _trained().save_pretrained(tmp_path)
    import transformers

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64))
    with pytest.raises(reftlib.CheckpointError, match="do not fit this model.*width 48"):
        reftlib.ReftModel.from_pretrained(tmp_path, other)


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    _trained().save_pretrained(tmp_path)
    path = tmp_path / "reft_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors.pop("layer_1_block_output.learned_source.bias")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(reftlib.CheckpointError, match="missing"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(reftlib.CheckpointError, match="has no reft_model.safetensors"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    with pytest.raises(reftlib.CheckpointError, match="neither an existing folder nor a Hub repo"):
        reftlib.ReftModel.from_pretrained(str(tmp_path / "nope" / "deeper"), tiny_model("llama"))


def test_load_from_offline_hub_cache(tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache without network (HF_HUB_OFFLINE)."""
    reft_model = _trained()
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-reft"
    snapshot = repo / "snapshots" / revision
    reft_model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = reftlib.ReftModel.from_pretrained("someone/tiny-reft", tiny_model("llama"), cache_dir=str(tmp_path / "hub"))
    assert torch.equal(_logits(loaded), _logits(reft_model))
    with pytest.raises(reftlib.CheckpointError, match="could not be fetched"):
        reftlib.ReftModel.from_pretrained("someone/absent", tiny_model("llama"), cache_dir=str(tmp_path / "hub"))


def test_pyreft_style_aliases(tmp_path):
    reft_model = _trained()
    reft_model.save(tmp_path)
    loaded = reftlib.ReftModel.load(tmp_path, tiny_model("llama"))
    assert torch.equal(_logits(loaded), _logits(reft_model))


def test_push_to_hub_uploads_folder_with_model_card(tmp_path):
    reft_model = _trained()
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, folder_path, repo_id, commit_message, **kwargs):
            calls["files"] = sorted(os.listdir(folder_path))
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            calls["commit"] = commit_message
            return "ok"

    assert reft_model.push_to_hub("me/my-reft", api=FakeApi(), private=True) == "ok"
    assert calls["create"] == ("me/my-reft", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["files"] == ["README.md", "reft_config.json", "reft_model.safetensors"]
    assert "library_name: reftlib" in calls["card"] and "layer_1_block_output" in calls["card"]


def test_format_version_1_rotations_are_converted(tmp_path):
    """Version 1 stored rotations in the hidden state's basis; reading one gives the same R."""
    from safetensors.torch import load_file, save_file

    reft_model = _trained()
    rotation = reft_model.interventions["layer_1_block_output"].rotate_layer.weight.detach().clone()
    reference = _logits(reft_model)
    reft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "reft_config.json").read_text())
    config["format_version"] = 1
    tensors = load_file(str(tmp_path / "reft_model.safetensors"))
    key = "layer_1_block_output.rotate_layer.raw"
    assert not torch.allclose(tensors[key] / tensors[key].norm(dim=0), rotation.T, atol=1e-3)  # really another basis
    tensors[key] = (rotation.T * 0.7).contiguous()  # what version 1 wrote: R's rows as columns (any length)
    text = json.dumps(config)
    save_file(tensors, str(tmp_path / "reft_model.safetensors"), metadata={"format": "pt", "reftlib_config": text})
    (tmp_path / "reft_config.json").write_text(text)
    loaded = reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    torch.testing.assert_close(loaded.interventions["layer_1_block_output"].rotate_layer.weight, rotation,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(loaded), reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- save_pretrained arguments (PEFT's)
def _three_adapters():
    reft_model = _trained()
    for name, layer in (("b", 2), ("c", 0)):
        reft_model.add_adapter(name, reftlib.ReftConfig(representations=[
            {"layer": layer, "component": "block_output", "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}
        ]))
    randomize(reft_model, seed=5)
    return reft_model


def _saved_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "reft_model.safetensors"))


def test_selected_adapters_are_the_ones_written(tmp_path):
    reft_model = _three_adapters()
    reft_model.save_pretrained(tmp_path / "bc", selected_adapters=["b", "c"])
    index = json.loads((tmp_path / "bc" / "reft_adapters.json").read_text())
    assert index["adapters"] == {"b": ".", "c": "c"}  # no "default": the first selected one is at the root
    assert sorted(p.name for p in (tmp_path / "bc").iterdir()) == [
        "c", "reft_adapters.json", "reft_config.json", "reft_model.safetensors"]
    loaded = reftlib.ReftModel.from_pretrained(tmp_path / "bc", tiny_model("llama"))
    assert loaded.adapter_names == ["b", "c"]
    for name in ("b", "c"):
        for key, value in loaded.adapters[name].state_dict().items():
            assert torch.equal(value, reft_model.adapters[name].state_dict()[key])

    reft_model.save_pretrained(tmp_path / "c", selected_adapters=["c"])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "reft_adapters.json", "reft_config.json", "reft_model.safetensors"]
    assert reftlib.ReftModel.from_pretrained(tmp_path / "c", tiny_model("llama")).adapter_names == ["c"]

    reft_model.save_pretrained(tmp_path / "alias", adapter_names=["c"])  # the older name still works
    assert reftlib.ReftModel.from_pretrained(tmp_path / "alias", tiny_model("llama")).adapter_names == ["c"]
    with pytest.raises(reftlib.ReftConfigError, match="not both"):
        reft_model.save_pretrained(tmp_path / "both", selected_adapters=["b"], adapter_names=["c"])
    with pytest.raises(reftlib.AdapterError, match="'nope'"):
        reft_model.save_pretrained(tmp_path / "bad", selected_adapters=["b", "nope"])
    assert not (tmp_path / "both").exists() and not (tmp_path / "bad").exists()


def test_is_main_process_false_writes_nothing(tmp_path):
    reft_model = _three_adapters()
    reft_model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    reft_model.save_pretrained(tmp_path / "kept")
    before = {p: p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()}
    with torch.no_grad():
        for p in reft_model.adapters.parameters():
            p.add_(1.0)
    reft_model.save_pretrained(tmp_path / "kept", is_main_process=False)
    assert {p: p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()} == before


def test_state_dict_weights_are_saved_instead_of_the_live_ones(tmp_path):
    reft_model = _three_adapters()
    live = {name: {k: v.clone() for k, v in reft_model.adapters[name].state_dict().items()}
            for name in reft_model.adapter_names}
    full = {k: v.detach().clone() for k, v in reft_model.state_dict().items()}
    assert any(k.startswith("model.") for k in full)  # base weights, to be ignored
    for key in full:
        if key.startswith("adapters."):
            full[key] = (full[key].float() * 2 + 1).to(torch.float64)  # other values, in another dtype
    reft_model.save_pretrained(tmp_path, state_dict=full)
    for name, folder in (("default", tmp_path), ("b", tmp_path / "b"), ("c", tmp_path / "c")):
        saved = _saved_tensors(folder)
        assert set(saved) == set(live[name])
        for key, value in saved.items():
            assert value.dtype == live[name][key].dtype  # as the config says (one intervention is bf16)
            assert torch.equal(value, full[reftlib.io.state_dict_key(name, key)].to(value.dtype))
            assert not torch.equal(value, live[name][key])
    for name in reft_model.adapter_names:  # the live modules were only read
        for key, value in reft_model.adapters[name].state_dict().items():
            assert torch.equal(value, live[name][key])

    partial = {k: v for k, v in full.items() if not k.startswith("adapters.c.")}
    with pytest.raises(reftlib.ReftConfigError, match="no tensors of adapter 'c'"):
        reft_model.save_pretrained(tmp_path / "partial", state_dict=partial)
    wrong = dict(full)
    wrong["adapters.b.layer_2_block_output.learned_source.bias"] = torch.zeros(5)
    with pytest.raises(reftlib.ReftConfigError, match="shape"):
        reft_model.save_pretrained(tmp_path / "wrong", state_dict=wrong)
    assert not (tmp_path / "partial").exists() and not (tmp_path / "wrong").exists()
    reft_model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"], state_dict=partial)  # c not needed


def test_unknown_save_arguments_are_refused(tmp_path):
    reft_model = _trained()
    with pytest.raises(reftlib.ReftConfigError, match="max_shard_size.*selected_adapters.*is_main_process"):
        reft_model.save_pretrained(tmp_path / "a", max_shard_size="1GB")
    with pytest.raises(reftlib.ReftConfigError, match="only safetensors"):
        reft_model.save_pretrained(tmp_path / "b", safe_serialization=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    reft_model.save_pretrained(tmp_path / "c", safe_serialization=True)
    assert (tmp_path / "c" / "reft_model.safetensors").is_file()


def test_get_base_model():
    model = tiny_model("llama")
    reft_model = reftlib.get_reft_model(model, [{"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}])
    assert reft_model.get_base_model() is model


def test_get_and_set_adapter_state_dict_round_trip(tmp_path):
    source = _three_adapters()
    state = reftlib.get_adapter_state_dict(source, "b")
    assert set(state) == set(source.adapters["b"].state_dict())
    source.save_pretrained(tmp_path)
    assert set(reftlib.get_adapter_state_dict(source)) == set(_saved_tensors(tmp_path))  # the file's names
    target = _three_adapters()
    randomize(target, seed=11)
    params = {k: id(v) for k, v in target.adapters["b"].named_parameters()}
    reftlib.set_adapter_state_dict(target, "b", state)
    for key, value in target.adapters["b"].state_dict().items():
        assert torch.equal(value, state[key])
    assert {k: id(v) for k, v in target.adapters["b"].named_parameters()} == params  # in place
    for model in (source, target):
        model.set_adapter(["default", "b", "c"])
    reftlib.set_adapter_state_dict(target, "default", source.state_dict())  # a full state dict works too
    assert not torch.equal(_logits(target), _logits(source))  # adapter c still differs
    reftlib.set_adapter_state_dict(target, "c", source.state_dict())
    assert torch.equal(_logits(target), _logits(source))
    # the full-state-dict form of get_adapter_state_dict returns the same tensors
    from_full = reftlib.get_adapter_state_dict(source, "c", state_dict=source.state_dict())
    assert all(torch.equal(from_full[k], v) for k, v in reftlib.get_adapter_state_dict(source, "c").items())

    before = {k: v.clone() for k, v in target.adapters["b"].state_dict().items()}
    broken = dict(state)
    broken.pop(next(iter(broken)))
    with pytest.raises(reftlib.CheckpointError, match="missing"):
        reftlib.set_adapter_state_dict(target, "b", broken)
    assert all(torch.equal(v, before[k]) for k, v in target.adapters["b"].state_dict().items())
    with pytest.raises(reftlib.AdapterError, match="'nope'"):
        reftlib.get_adapter_state_dict(target, "nope")


# --------------------------------------------------------------------------- classification head options
def _classifier():
    from reftlib.training import get_reft_model_for_sequence_classification

    torch.manual_seed(0)
    reps = [{"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}]
    reft_model = get_reft_model_for_sequence_classification(
        tiny_model("llama"), reps, num_labels=3, pooling="mean", problem_type="multi_label_classification",
        classifier_dropout=0.25)
    randomize(reft_model)
    with torch.no_grad():
        reft_model.classifier.out_proj.weight.normal_()
    return reft_model.eval()


def _classify(reft_model):
    with torch.no_grad():
        return reft_model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def test_classification_head_options_are_saved_by_name(tmp_path):
    from reftlib.training import ReftModelForSequenceClassification

    reft_model = _classifier()
    reft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "reft_config.json").read_text())
    assert config["extra"] == {"classifier": {"num_labels": 3, "pooling": "mean",
                                              "problem_type": "multi_label_classification", "dropout": 0.25}}
    assert sorted(k for k in _saved_tensors(tmp_path) if k.startswith("__extra__.")) == [
        "__extra__.classifier.out_proj.bias", "__extra__.classifier.out_proj.weight"]
    loaded = ReftModelForSequenceClassification.from_pretrained(tmp_path, tiny_model("llama"))
    assert (loaded.num_labels, loaded.pooling, loaded.problem_type) == (3, "mean", "multi_label_classification")
    assert loaded.classifier.dropout.p == 0.25
    assert torch.equal(_classify(loaded), _classify(reft_model))

    # the head's tensors come from a full state dict as well
    full = {k: v.clone() for k, v in reft_model.state_dict().items()}
    full["classifier.out_proj.bias"] = full["classifier.out_proj.bias"] + 1
    reft_model.save_pretrained(tmp_path / "full", state_dict=full)
    assert torch.equal(_saved_tensors(tmp_path / "full")["__extra__.classifier.out_proj.bias"],
                       full["classifier.out_proj.bias"])


def test_classification_file_with_option_codes_still_loads(tmp_path):
    """Files written before the options were stored by name held them as indices in a tensor."""
    from safetensors.torch import save_file

    from reftlib.training import ReftModelForSequenceClassification

    reft_model = _classifier()
    reft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "reft_config.json").read_text())
    del config["extra"]
    tensors = _saved_tensors(tmp_path)
    tensors["__extra__.classifier.config"] = torch.tensor([3, 2, 2])  # num_labels, "mean", "multi_label_..."
    text = json.dumps(config)
    save_file(tensors, str(tmp_path / "reft_model.safetensors"), metadata={"format": "pt", "reftlib_config": text})
    (tmp_path / "reft_config.json").write_text(text)
    loaded = ReftModelForSequenceClassification.from_pretrained(tmp_path, tiny_model("llama"))
    assert (loaded.num_labels, loaded.pooling, loaded.problem_type) == (3, "mean", "multi_label_classification")
    assert torch.equal(_classify(loaded), _classify(reft_model))

    config["extra"] = {"classifier": {"num_labels": 3, "pooling": "median", "problem_type": "regression"}}
    _rewrite_config(tmp_path, lambda c: c.update(extra=config["extra"]))
    with pytest.raises(reftlib.CheckpointError, match="pooling='median'"):
        ReftModelForSequenceClassification.from_pretrained(tmp_path, tiny_model("llama"))


# --------------------------------------------------------------------------- format version on every read path
def _make_newer(folder, what):
    if what == "index":
        index = json.loads((folder / "reft_adapters.json").read_text())
        index["format_version"] = 99
        (folder / "reft_adapters.json").write_text(json.dumps(index))
    else:
        _rewrite_config(folder, lambda c: c.update(format_version=99))


@pytest.mark.parametrize("what", ["index", "config"])
def test_newer_format_is_refused_on_every_read_path(tmp_path, capsys, what):
    from reftlib.cli import describe_folder, main
    from reftlib.training import load_intervention_weights

    reft_model = _three_adapters()
    reft_model.save_pretrained(tmp_path)
    _make_newer(tmp_path, what)
    with pytest.raises(reftlib.CheckpointError, match="newer reftlib"):
        reftlib.ReftModel.from_pretrained(tmp_path, tiny_model("llama"))
    fresh = reftlib.get_reft_model(tiny_model("llama"), [{"layer": 0, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}],
                                   adapter_name="mine")
    with pytest.raises(reftlib.CheckpointError, match="newer reftlib"):
        fresh.load_adapter(tmp_path, adapter_name="default")
    before = {k: v.clone() for k, v in reft_model.state_dict().items() if k.startswith("adapters.")}
    with pytest.raises(reftlib.CheckpointError, match="newer reftlib"):  # what the trainer's resume calls
        load_intervention_weights(reft_model, tmp_path)
    assert all(torch.equal(reft_model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(reftlib.CheckpointError, match="newer reftlib"):
        describe_folder(tmp_path)
    assert main(["info", str(tmp_path)]) == 2
    assert "newer reftlib" in capsys.readouterr().err


def test_trainer_save_takes_a_gathered_state_dict(tmp_path):
    from transformers import TrainingArguments

    from reftlib.training import ReftTrainer

    reft_model = _trained()
    trainer = ReftTrainer(model=reft_model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                                    use_cpu=True))
    full = {k: v.clone() + 1 if k.startswith("adapters.") else v for k, v in reft_model.state_dict().items()}
    trainer._save(str(tmp_path / "gathered"), state_dict=full)
    trainer._save(str(tmp_path / "placeholder"), state_dict={})  # DeepSpeed's stand-in: the live weights
    for key, value in _saved_tensors(tmp_path / "gathered").items():
        assert torch.equal(value, full[reftlib.io.state_dict_key("default", key)])
    live = reftlib.get_adapter_state_dict(reft_model)
    assert all(torch.equal(v, live[k]) for k, v in _saved_tensors(tmp_path / "placeholder").items())
