"""The ``reftlib`` command line: train from a config, generate, info, help, and clear config errors.

Everything runs in-process through :func:`reftlib.cli.main` on a tiny Llama saved into a temporary
folder (plus one subprocess check of ``python -m reftlib``); nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

import reftlib
from reftlib import ReftConfigError
from reftlib.cli import main
from reftlib.recipe import TRAIN_RECORD_NAME, load_train_config, read_records
from reftlib.train_config import parse_train_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["apple", "banana split", "cherry", "date"]
OUTPUTS = ["r", "ye", "d", "b"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a tiny Llama + chat tokenizer (``model/``), a JSONL data file and a YAML config."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer("llama", chat_template=True).save_pretrained(root / "model")
    rows = [{"prompt": p, "output": o} for p, o in zip(PROMPTS, OUTPUTS)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "config.yaml").write_text(
        "model: model\n"
        "data:\n  path: data.jsonl\n"
        "intervention:\n  layers: [0, 2]\n  positions: f2+l2\n  rank: 2\n  share_weights: false\n"
        "training:\n  output_dir: unused\n  max_steps: 3\n  learning_rate: 3e-2\n  batch_size: 4\n"
        "  save_strategy: no\n"
    )
    return root


@pytest.fixture(scope="module")
def trained(workdir) -> Path:
    """The folder written by ``reftlib train`` (3 steps)."""
    out = workdir / "out"
    code = main(["train", str(workdir / "config.yaml"), "--output-dir", str(out), "--quiet"])
    assert code == 0
    return out


def write_config(folder: Path, text: str, name: str = "bad.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


BASE_CONFIG = "model: model\ndata:\n  path: data.jsonl\nintervention:\n  layers: 1\n"


# --------------------------------------------------------------------------- help
def test_help_explains_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("train", "generate", "info", "examples:", "reftlib generate emoji-reft"):
        assert word in out
    assert main([]) == 2  # no command: help on stderr, usage error
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "generate", "info"])
def test_subcommand_help(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    if command == "train":  # the config reference: every section and a few keys with defaults
        for word in ("intervention:", "training:", "share_weights", "learning_rate", "[4e-3]", "loreft"):
            assert word in out


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "reftlib", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage: reftlib" in result.stdout and "generate" in result.stdout


def test_usage_error_exit_code(capsys):
    assert main(["train"]) == 2  # missing CONFIG (argparse)
    assert main(["generate", "x", "--mode", "nope"]) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------- train / generate / info
def test_train_saves_a_loadable_folder(trained, workdir):
    assert (trained / "reft_config.json").is_file() and (trained / "reft_model.safetensors").is_file()
    record = json.loads((trained / TRAIN_RECORD_NAME).read_text())
    assert record["model"] == str((workdir / "model").resolve())
    assert record["chat_template"] is True  # auto: the tokenizer has a chat template
    assert record["result"]["steps"] == 3
    assert not (workdir / "unused").exists()  # --output-dir wins over training.output_dir

    model = tiny_model("llama")
    reft_model = reftlib.ReftModel.from_pretrained(trained, model)
    reps = reft_model.reft_config.representations
    # share_weights: false with f2+l2 -> each layer twice: the first copy on f2, the second on l2
    assert [(r.layer, r.positions) for r in reps] == [(0, "f2"), (2, "f2"), (0, "l2"), (2, "l2")]
    assert record["result"]["trainable_parameters"] == reft_model.count_parameters(trainable_only=False)


def test_generate_compare_json_matches_python(trained, workdir, capsys):
    code = main(["generate", str(trained), "--prompt", "apple", "--prompt", "date", "--max-new-tokens", "4",
                 "--compare", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["apple", "date"]

    # The same answers from Python: chat template, left padding, the positions saved with each intervention.
    tokenizer = tiny_tokenizer("llama", chat_template=True)
    tokenizer.padding_side = "left"
    reft_model = reftlib.ReftModel.from_pretrained(trained, tiny_model("llama"))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in ("apple", "date")]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    steered = reft_model.generate(**batch, **kwargs)
    with reft_model.disable_interventions():
        base = reft_model.generate(**batch, **kwargs)
    width = batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        assert row["output"] == tokenizer.decode(steered[i, width:], skip_special_tokens=True).strip()
        assert row["base_output"] == tokenizer.decode(base[i, width:], skip_special_tokens=True).strip()


def test_generate_text_output_and_prompts_file(trained, workdir, capsys):
    prompts = workdir / "prompts.txt"
    prompts.write_text("apple\n\ncherry\n")
    code = main(["generate", str(trained), "--prompts-file", str(prompts), "--max-new-tokens", "2", "--compare",
                 "--no-chat-template", "--mode", "prompt+generated", "--positions", "l1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "[1] apple" in out and "[2] cherry" in out and "with interventions:" in out


def test_info(trained, capsys):
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    for word in ("adapter 'default'", "layer_0_block_output_1", "loreft", "block_output", "f2", "l2",
                 "final loss", "520"):  # 4 x LoReFT rank 2 on width 32: 4 * (2*32 + 2*32 + 2) = 520
        assert word in out
    assert main(["info", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"][0]["parameters"] == 520
    assert [iv["layer"] for iv in info["adapters"][0]["interventions"]] == [0, 2, 0, 2]


def test_dry_run_trains_nothing(workdir, capsys):
    out = workdir / "dry"
    assert main(["train", str(workdir / "config.yaml"), "--output-dir", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 x loreft (rank 2)" in text and "trainable      520 parameters" in text and "3 steps" in text
    assert not out.exists()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("text", "expected"), [
    (BASE_CONFIG.replace("model:", "modle:"), ["unknown key 'modle'", "did you mean 'model'"]),
    (BASE_CONFIG + "training:\n  lrr: 0.1\n", ["'training.lrr'", "did you mean 'lr'", "learning_rate"]),
    (BASE_CONFIG + "  component: mlp_out\n", ["intervention.component", "mlp_output", "block_output"]),
    (BASE_CONFIG + "  positions: last\n", ["intervention.positions", "'f<n>+l<m>'"]),
    (BASE_CONFIG + "  type: lorraft\n", ["intervention.type", "loreft", "direft"]),
    (BASE_CONFIG + "  type: head_bias\n  rank: 4\n", ["intervention.rank", "has no rank"]),
    (BASE_CONFIG + "  kwargs: {drop: 0.1}\n", ["intervention", "unknown argument(s) ['drop']"]),
    (BASE_CONFIG + "training:\n  save_strategy: sometimes\n", ["training.save_strategy", "epoch"]),
    (BASE_CONFIG + "training:\n  epochs: many\n", ["training.epochs", "must be a number"]),
    (BASE_CONFIG + "training:\n  args: {output_dir: x}\n", ["training.args.output_dir", "training.output_dir"]),
    (BASE_CONFIG + "training:\n  args: {optimm: adamw_torch}\n", ["training.args.optimm", "did you mean 'optim'"]),
    (BASE_CONFIG.replace("data.jsonl", "missing.jsonl"), ["data.path", "file not found"]),
    (BASE_CONFIG.replace("layers: 1", "rank: 2"), ["intervention.layers", "missing"]),
    (BASE_CONFIG.replace("model: model", "model: no/such/folder"), ["model", "not a local model folder"]),
    (BASE_CONFIG.replace("layers: 1", "layers: 7"), ["layer 7 does not exist", "valid 0..2"]),
    ("model: model\n", ["data", "missing section"]),
    ("- a\n- b\n", ["must be a mapping"]),
])
def test_bad_config_exits_2_with_a_clear_message(workdir, capsys, text, expected):
    path = write_config(workdir, text)
    assert main(["train", str(path), "--dry-run", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(path) in err or "bad.yaml" in err
    for word in expected:
        assert word in err, err


def test_other_errors(workdir, trained, capsys):
    assert main(["info", str(workdir / "nope")]) == 2
    assert main(["generate", str(trained)]) == 2  # no prompts
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", str(workdir / "model"), "--prompt", "x"]) == 2  # not an interventions folder
    assert "reft_model.safetensors" in capsys.readouterr().err
    assert main(["train", str(workdir / "config.yaml"), "--set", "training.epochs"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unexpected_failure_exits_1_with_traceback(workdir, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("reftlib.recipe.train_from_config", boom)
    assert main(["train", str(workdir / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


# --------------------------------------------------------------------------- config parsing
def test_yaml_quirks_and_aliases(workdir):
    path = write_config(workdir, BASE_CONFIG + "training:\n  lr: 4e-3\n  save_strategy: no\n  epochs: 2\n",
                        name="quirks.yaml")
    config = load_train_config(path, ["intervention.layers=[0, 1]", "training.batch_size=2"])
    assert config.learning_rate == pytest.approx(4e-3)  # YAML reads 4e-3 as a string
    assert config.save_strategy == "no"  # YAML reads `no` as False
    assert config.layers == [0, 1] and config.batch_size == 2
    assert config.data_path == (workdir / "data.jsonl").resolve()  # relative to the config file
    assert config.output_dir == Path("reft-output").resolve()  # relative to the current folder


def test_json_config_and_share_weights(workdir):
    data = {"model": "model", "data": {"path": "data.jsonl"},
            "intervention": {"layers": [0, 1], "positions": "f1+l1", "share_weights": True}}
    config = parse_train_config(data, base_dir=workdir, source="inline")
    assert config.num_interventions == 2
    assert [r.positions for r in config.reft_config().representations] == ["f1+l1", "f1+l1"]
    with pytest.raises(ReftConfigError, match="lists a layer twice"):
        parse_train_config({**data, "intervention": {"layers": [1, 1]}}, base_dir=workdir)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.*")
                                          if p.suffix in (".yaml", ".yml", ".json")))
def test_example_configs_are_valid(config):
    parsed = load_train_config(ROOT / "examples" / "configs" / config)  # validates without loading a model
    assert parsed.model == "default" and parsed.data_path.is_file()
    assert parsed.reft_config().representations


def test_read_records_formats(tmp_path):
    (tmp_path / "a.csv").write_text("question,answer\nhi,there\n")
    (tmp_path / "a.json").write_text(json.dumps([{"q": "hi", "a": 1}]))
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\nnot json\n')
    assert read_records(tmp_path / "a.csv") == [{"question": "hi", "answer": "there"}]
    assert read_records(tmp_path / "a.json") == [{"q": "hi", "a": 1}]
    with pytest.raises(ReftConfigError, match="line 2"):
        read_records(tmp_path / "bad.jsonl")


def test_csv_columns_are_configurable(workdir, capsys):
    (workdir / "pairs.csv").write_text("question,answer\n" + "".join(f"{p},{o}\n" for p, o in zip(PROMPTS, OUTPUTS)))
    path = write_config(workdir, "model: model\nchat_template: false\n"
                                 "data: {path: pairs.csv, prompt_column: question, output_column: answer}\n"
                                 "intervention: {layers: 1, type: noreft, rank: 1}\n", name="csv.yaml")
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "4 examples (chat template: off)" in capsys.readouterr().out
    path = write_config(workdir, "model: model\ndata: {path: pairs.csv}\nintervention: {layers: 1}\n", name="c2.yaml")
    assert main(["train", str(path), "--dry-run"]) == 2
    assert "data.prompt_column" in capsys.readouterr().err


def test_old_cli_names_still_work_with_a_deprecation_warning():
    """The names that moved to reftlib.train_config / recipe / generation stay importable for one release."""
    import reftlib.cli
    import reftlib.generation
    import reftlib.recipe
    import reftlib.train_config

    for name, module in (("generate_texts", reftlib.generation), ("tokenize_prompts", reftlib.generation),
                         ("parse_train_config", reftlib.train_config), ("TrainConfig", reftlib.train_config),
                         ("load_train_config", reftlib.recipe), ("train_from_config", reftlib.recipe),
                         ("load_model", reftlib.recipe), ("read_records", reftlib.recipe),
                         ("read_examples", reftlib.recipe)):
        with pytest.warns(DeprecationWarning, match=f"reftlib.cli.{name} moved to {module.__name__}.{name}"):
            assert getattr(reftlib.cli, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reftlib.cli.nope  # noqa: B018
