"""The ``reftlib`` command line: train interventions from a config file, generate with them, inspect them.

Three commands (``reftlib COMMAND --help`` explains each)::

    reftlib train CONFIG.yaml                     # train and save_pretrained into training.output_dir
    reftlib generate FOLDER --prompt "Hi" --compare
    reftlib info FOLDER

``python -m reftlib`` is the same program. Exit status: 0 on success, 2 for usage and
configuration errors (the :class:`~reftlib.errors.ReftError` message is printed, without a
traceback), 1 for any other failure (printed with its traceback).

The training config is a small YAML or JSON file; :func:`load_train_config` validates it
without loading any model, and :func:`train_from_config` runs it. ``reftlib train --help``
lists every key with its default.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import textwrap
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import COMPONENTS, ReftConfig
from .errors import ReftConfigError, ReftError
from .interventions import intervention_class, registered_interventions
from .model import _GENERATION_MODES as GENERATION_MODES
from .positions import parse_position_spec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .model import ReftModel

__all__ = [
    "DEFAULT_MODEL_ALIASES",
    "TRAIN_RECORD_NAME",
    "TrainConfig",
    "build_parser",
    "load_model",
    "load_train_config",
    "main",
    "parse_train_config",
    "read_records",
    "train_from_config",
]

PROG = "reftlib"

#: ``model`` values meaning the offline SmolLM2-135M-Instruct of :mod:`reftlib.offline`.
DEFAULT_MODEL_ALIASES = ("default", "smollm2")

#: Written next to the interventions by ``reftlib train``; ``reftlib generate`` reads its model and
#: chat-template settings so that ``reftlib generate FOLDER --prompt ...`` needs nothing else.
TRAIN_RECORD_NAME = "reftlib_train.json"

_DTYPES = ("float32", "bfloat16", "float16")
_SAVE_STRATEGIES = ("no", "steps", "epoch")
_GENERATION_MODES = tuple(GENERATION_MODES)
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")

# Every config key, by section, with the help text shown by `reftlib train --help`. Validation uses the
# same tables, so the documentation cannot drift from what is accepted.
_TOP_KEYS: dict[str, str] = {
    "model": "'default' (SmolLM2-135M-Instruct, offline) or a local Hugging Face model folder [default]",
    "dtype": f"model dtype: one of {', '.join(_DTYPES)} [float32]",
    "chat_template": "wrap prompts as a user turn with the tokenizer's chat template: true/false "
                     "[true when the tokenizer has one]",
    "system_prompt": "system turn added by the chat template [none]",
    "data": "section: the training examples",
    "intervention": "section: what to attach where",
    "training": "section: training arguments",
}
_DATA_KEYS: dict[str, str] = {
    "path": "training examples: .json (a list of objects), .jsonl, .csv or .tsv (required)",
    "prompt_column": "field holding the prompt [prompt]",
    "output_column": "field holding the answer to learn [output]",
    "max_length": "longest example in tokens; longer answers are cut [the model's maximum]",
    "nonstop": "do not append EOS to the answers: true/false [false]",
}
_INTERVENTION_KEYS: dict[str, str] = {
    "layers": "layer index or list of indices, e.g. 15 or [8, 15] (required)",
    "component": f"where in each layer: {', '.join(COMPONENTS)} [block_output]",
    "positions": "prompt tokens to edit: 'l1' (last), 'f3' (first 3), 'f7+l7', 'all' [l1]",
    "type": "intervention type (see below) [loreft]",
    "rank": "low rank r for the low-rank types [4]",
    "kwargs": "extra constructor arguments of the type, e.g. {dropout: 0.05, act_fn: relu} [{}]",
    "share_weights": "with 'f<n>+l<m>' positions: false = one intervention per layer for the first "
                     "tokens and another for the last tokens (pyreft's convention); true = one "
                     "intervention per layer for both [false]",
}
_TRAINING_KEYS: dict[str, str] = {
    "output_dir": "folder for the trained interventions (relative to the current folder) [reft-output]",
    "epochs": "passes over the data [10]",
    "max_steps": "stop after this many optimizer steps; overrides epochs when > 0 [-1]",
    "learning_rate": "peak learning rate (alias: lr) [4e-3]",
    "batch_size": "examples per step (per device) [8]",
    "gradient_accumulation_steps": "batches per optimizer step [1]",
    "seed": "random seed (initialization and data order) [42]",
    "logging_steps": "log the loss every N steps [about 10 logs per run]",
    "save_strategy": "intermediate checkpoints: no, steps, epoch [no]; the final save always happens",
    "save_steps": "checkpoint every N steps with save_strategy: steps [500]",
    "save_total_limit": "keep at most N checkpoints [all]",
    "lr_scheduler_type": "linear, constant, cosine, ... [linear]",
    "warmup_steps": "learning-rate warmup steps (a float < 1 is a fraction of the run) [0]",
    "weight_decay": "weight decay of intervention weights (never biases) [0.0]",
    "bf16": "bfloat16 mixed precision: true/false [false]",
    "gradient_checkpointing": "trade compute for memory: true/false [false]",
    "args": "any other transformers.TrainingArguments fields, e.g. {optim: adamw_torch} [{}]",
}
_ALIASES = {("training", "lr"): "learning_rate", ("training", "num_train_epochs"): "epochs",
            ("training", "per_device_train_batch_size"): "batch_size", ("intervention", "layer"): "layers",
            ("intervention", "low_rank_dimension"): "rank", ("intervention", "intervention_type"): "type"}
# TrainingArguments that the CLI sets itself and that `training.args` may therefore not give.
_RESERVED_ARGS = {
    "output_dir": "training.output_dir", "num_train_epochs": "training.epochs", "max_steps": "training.max_steps",
    "learning_rate": "training.learning_rate", "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps", "seed": "training.seed",
    "logging_steps": "training.logging_steps", "save_strategy": "training.save_strategy",
    "save_steps": "training.save_steps", "save_total_limit": "training.save_total_limit",
    "lr_scheduler_type": "training.lr_scheduler_type", "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay", "bf16": "training.bf16",
    "gradient_checkpointing": "training.gradient_checkpointing", "activation_checkpointing": "training.gradient_checkpointing",
}


# =============================================================================== the training config
@dataclasses.dataclass
class TrainConfig:
    """A validated ``reftlib train`` config (see ``reftlib train --help`` for the file format).

    Paths are resolved: ``data_path`` (and a model folder) relative to the config file,
    ``output_dir`` relative to the current folder. ``model`` is ``"default"`` or an absolute folder.
    """

    model: str
    data_path: Path
    layers: list[int]
    output_dir: Path
    dtype: str = "float32"
    chat_template: bool | None = None
    system_prompt: str | None = None
    prompt_column: str = "prompt"
    output_column: str = "output"
    max_length: int | None = None
    nonstop: bool = False
    component: str = "block_output"
    positions: str = "l1"
    intervention_type: str = "loreft"
    rank: int | None = 4
    intervention_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    share_weights: bool = False
    epochs: float = 10.0
    max_steps: int = -1
    learning_rate: float = 4e-3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    seed: int = 42
    logging_steps: int | None = None
    save_strategy: str = "no"
    save_steps: int = 500
    save_total_limit: int | None = None
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    weight_decay: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    extra_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<config>"

    @property
    def split_positions(self) -> bool:
        """Whether each layer gets two interventions (``f`` part and ``l`` part, ``share_weights: false``)."""
        parsed = parse_position_spec(self.positions)
        return parsed is not None and bool(parsed[0]) and bool(parsed[1]) and not self.share_weights

    def representation_positions(self) -> list[str]:
        """The default positions stored with each intervention, in config order.

        With split positions (``"f3+l3"``, ``share_weights: false``) the layers are listed twice: the
        first copy acts on the first tokens (``"f3"``), the second on the last tokens (``"l3"``), which is
        what the data module gives them during training.
        """
        if not self.split_positions:
            return [self.positions] * len(self.layers)
        parsed = parse_position_spec(self.positions)
        assert parsed is not None
        return [f"f{parsed[0]}"] * len(self.layers) + [f"l{parsed[1]}"] * len(self.layers)

    def reft_config(self) -> ReftConfig:
        """A fresh :class:`~reftlib.ReftConfig` (new, unbuilt interventions) for this config."""
        layers = self.layers * 2 if self.split_positions else list(self.layers)
        reps = []
        for layer, positions in zip(layers, self.representation_positions()):
            kwargs = dict(self.intervention_kwargs)
            if self.rank is not None:
                kwargs["low_rank_dimension"] = self.rank
            reps.append({"layer": layer, "component": self.component, "positions": positions,
                         "intervention": self.intervention_type, "intervention_kwargs": kwargs})
        return ReftConfig(representations=reps)

    @property
    def num_interventions(self) -> int:
        return len(self.layers) * (2 if self.split_positions else 1)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready settings, saved as ``reftlib_train.json`` next to the trained interventions."""
        return {
            "model": self.model, "dtype": self.dtype, "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "config_file": str(Path(self.source).resolve()) if Path(self.source).is_file() else self.source,
            "data": {"path": str(self.data_path), "prompt_column": self.prompt_column,
                     "output_column": self.output_column, "max_length": self.max_length, "nonstop": self.nonstop},
            "intervention": {"layers": self.layers, "component": self.component, "positions": self.positions,
                             "type": self.intervention_type, "rank": self.rank, "kwargs": self.intervention_kwargs,
                             "share_weights": self.share_weights},
            "training": {"epochs": self.epochs, "max_steps": self.max_steps, "learning_rate": self.learning_rate,
                         "batch_size": self.batch_size, "seed": self.seed},
        }


def _err(source: str, key: str, message: str) -> ReftConfigError:
    return ReftConfigError(f"{source}: {key}: {message}")


def _check_keys(section: Mapping[str, Any], allowed: Mapping[str, str], name: str, source: str) -> dict[str, Any]:
    """Reject unknown keys (with a 'did you mean' hint) and map aliases to their canonical names."""
    result: dict[str, Any] = {}
    for key, value in section.items():
        canonical = _ALIASES.get((name, key), key) if isinstance(key, str) else key
        if canonical not in allowed:
            where = f"{name}.{key}" if name else str(key)
            hint = difflib.get_close_matches(str(key), list(allowed) + [a for (s, a) in _ALIASES if s == name], n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            scope = f"in '{name}'" if name else "at the top level"
            raise ReftConfigError(
                f"{source}: unknown key {where!r}{did_you_mean}. Allowed keys {scope}: {', '.join(allowed)}"
            )
        if canonical in result:
            raise _err(source, f"{name}.{canonical}" if name else canonical, f"given twice (as {key!r} and an alias)")
        result[canonical] = value
    return result


def _section(data: Mapping[str, Any], name: str, source: str, required: bool = False) -> Mapping[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise _err(source, name, f"missing section; it needs at least: {_REQUIRED_HINT[name]}")
        return {}
    if not isinstance(value, Mapping):
        raise _err(source, name, f"must be a mapping of keys (e.g. {_REQUIRED_HINT[name]}), got {value!r}")
    return value


_REQUIRED_HINT = {"data": "{path: examples.jsonl}", "intervention": "{layers: 15}",
                  "training": "{output_dir: my-reft}"}


def _as_int(value: Any, key: str, source: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _err(source, key, f"must be an integer, got {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise _err(source, key, f"must be an integer, got {value!r}") from None
    if isinstance(number, float) and not number.is_integer():
        raise _err(source, key, f"must be an integer, got {value!r}")
    number = int(number)
    if minimum is not None and number < minimum:
        raise _err(source, key, f"must be at least {minimum}, got {number}")
    return number


def _as_float(value: Any, key: str, source: str, minimum: float | None = None, strict: bool = False) -> float:
    # YAML reads `4e-3` (no dot) as a string: accept numeric strings.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _err(source, key, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _err(source, key, f"must be a number, got {value!r}") from None
    if not math.isfinite(number) or (minimum is not None and (number <= minimum if strict else number < minimum)):
        bound = f"greater than {minimum}" if strict else f"at least {minimum}"
        raise _err(source, key, f"must be {bound}, got {value!r}")
    return number


def _as_bool(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise _err(source, key, f"must be true or false, got {value!r}")


def _as_str(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(source, key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _resolve_model(value: Any, base_dir: Path, source: str) -> str:
    name = _as_str(value, "model", source)
    if name.lower() in DEFAULT_MODEL_ALIASES:
        return "default"
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_dir():
        raise _err(source, "model", (
            f"{name!r} is not a local model folder (looked for {path}). Use 'default' for the offline "
            "SmolLM2-135M-Instruct, or a folder written by save_pretrained (the CLI never downloads; fetch a "
            "Hub model first, e.g. `huggingface-cli download NAME --local-dir DIR`)"))
    if not (path / "config.json").is_file():
        raise _err(source, "model", f"{path} has no config.json; it is not a Hugging Face model folder")
    return str(path.resolve())


def parse_train_config(data: Any, *, base_dir: str | os.PathLike = ".", source: str = "<config>") -> TrainConfig:
    """Validate a config mapping (as read from YAML/JSON) and return a :class:`TrainConfig`.

    Nothing is loaded except the data file's existence and suffix check. Every error is a
    :class:`~reftlib.errors.ReftConfigError` naming ``source``, the bad key and what is allowed.
    """
    if not isinstance(data, Mapping):
        raise ReftConfigError(f"{source}: the config must be a mapping of sections (model, data, intervention, "
                              f"training), got {type(data).__name__}")
    base = Path(base_dir)
    top = _check_keys(data, _TOP_KEYS, "", source)
    data_section = _check_keys(_section(top, "data", source, required=True), _DATA_KEYS, "data", source)
    iv = _check_keys(_section(top, "intervention", source, required=True), _INTERVENTION_KEYS, "intervention", source)
    train = _check_keys(_section(top, "training", source), _TRAINING_KEYS, "training", source)
    kwargs: dict[str, Any] = {"source": source}

    # ---------------------------------------------------------------- model
    kwargs["model"] = _resolve_model(top.get("model", "default"), base, source)
    if top.get("dtype") is not None:
        dtype = str(top["dtype"]).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise _err(source, "dtype", f"unknown dtype {top['dtype']!r}; use one of {', '.join(_DTYPES)}")
        kwargs["dtype"] = dtype
    template = top.get("chat_template")
    if template is not None and not (isinstance(template, str) and template.strip().lower() == "auto"):
        kwargs["chat_template"] = _as_bool(template, "chat_template", source)
    if top.get("system_prompt") is not None:
        if not isinstance(top["system_prompt"], str):
            raise _err(source, "system_prompt", f"must be a string, got {top['system_prompt']!r}")
        kwargs["system_prompt"] = top["system_prompt"]

    # ---------------------------------------------------------------- data
    if data_section.get("path") is None:
        raise _err(source, "data.path", "missing; give the examples file, e.g. `path: examples.jsonl`")
    path = Path(_as_str(data_section["path"], "data.path", source)).expanduser()
    path = path if path.is_absolute() else base / path
    if path.suffix.lower() not in _DATA_SUFFIXES:
        raise _err(source, "data.path", f"{path.name!r} has an unsupported suffix; use one of {', '.join(_DATA_SUFFIXES)}")
    if not path.is_file():
        raise _err(source, "data.path", f"file not found: {path} (relative paths start at the config file's folder)")
    kwargs["data_path"] = path.resolve()
    for key in ("prompt_column", "output_column"):
        if data_section.get(key) is not None:
            kwargs[key] = _as_str(data_section[key], f"data.{key}", source)
    if data_section.get("max_length") is not None:
        kwargs["max_length"] = _as_int(data_section["max_length"], "data.max_length", source, minimum=2)
    if data_section.get("nonstop") is not None:
        kwargs["nonstop"] = _as_bool(data_section["nonstop"], "data.nonstop", source)

    # ---------------------------------------------------------------- intervention
    layers = iv.get("layers")
    if layers is None:
        raise _err(source, "intervention.layers", "missing; give a layer index or a list, e.g. `layers: 15` "
                                                  "or `layers: [8, 15]`")
    layer_list = layers if isinstance(layers, (list, tuple)) else [layers]
    if not layer_list:
        raise _err(source, "intervention.layers", "is empty; give at least one layer index")
    kwargs["layers"] = [_as_int(x, "intervention.layers", source) for x in layer_list]
    if len(set(kwargs["layers"])) != len(kwargs["layers"]):
        raise _err(source, "intervention.layers", f"lists a layer twice ({kwargs['layers']}); use share_weights: "
                                                  "false with 'f<n>+l<m>' positions for two interventions per layer")
    if iv.get("component") is not None:
        component = _as_str(iv["component"], "intervention.component", source)
        if component not in COMPONENTS:
            hint = difflib.get_close_matches(component, COMPONENTS, n=1)
            raise _err(source, "intervention.component", f"unknown component {component!r}"
                       + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; use one of {', '.join(COMPONENTS)}")
        kwargs["component"] = component
    if iv.get("positions") is not None:
        spec = str(iv["positions"]).strip().lower()
        try:
            parse_position_spec(spec)
        except ReftError as exc:
            raise _err(source, "intervention.positions", str(exc)) from None
        kwargs["positions"] = spec
    type_name = iv.get("type", "loreft")
    try:
        cls = intervention_class(_as_str(type_name, "intervention.type", source))
    except ReftConfigError:
        raise _err(source, "intervention.type", f"unknown type {type_name!r}; use one of "
                                                f"{', '.join(sorted(registered_interventions()))}") from None
    kwargs["intervention_type"] = cls.type_name
    takes_rank = "low_rank_dimension" in cls._accepted_arguments()
    if iv.get("rank") is not None:
        if not takes_rank:
            raise _err(source, "intervention.rank", f"type {cls.type_name!r} has no rank; remove the key")
        kwargs["rank"] = _as_int(iv["rank"], "intervention.rank", source, minimum=1)
    elif not takes_rank:
        kwargs["rank"] = None
    extra = iv.get("kwargs") or {}
    if not isinstance(extra, Mapping):
        raise _err(source, "intervention.kwargs", f"must be a mapping such as {{dropout: 0.05}}, got {extra!r}")
    if "low_rank_dimension" in extra:
        raise _err(source, "intervention.kwargs", "give the rank as intervention.rank, not in kwargs")
    kwargs["intervention_kwargs"] = dict(extra)
    if iv.get("share_weights") is not None:
        kwargs["share_weights"] = _as_bool(iv["share_weights"], "intervention.share_weights", source)

    # ---------------------------------------------------------------- training
    kwargs["output_dir"] = Path(_as_str(train.get("output_dir", "reft-output"), "training.output_dir",
                                        source)).expanduser().resolve()
    if train.get("epochs") is not None:
        kwargs["epochs"] = _as_float(train["epochs"], "training.epochs", source, minimum=0, strict=True)
    if train.get("max_steps") is not None:
        kwargs["max_steps"] = _as_int(train["max_steps"], "training.max_steps", source, minimum=-1)
        if kwargs["max_steps"] == 0:
            raise _err(source, "training.max_steps", "must be positive (or -1 to train for `epochs`)")
    if train.get("learning_rate") is not None:
        kwargs["learning_rate"] = _as_float(train["learning_rate"], "training.learning_rate", source, 0, strict=True)
    for key, minimum in (("batch_size", 1), ("gradient_accumulation_steps", 1), ("seed", 0), ("logging_steps", 1),
                         ("save_steps", 1), ("save_total_limit", 1)):
        if train.get(key) is not None:
            kwargs[key] = _as_int(train[key], f"training.{key}", source, minimum=minimum)
    if "save_strategy" in train:
        strategy = train["save_strategy"]
        strategy = "no" if strategy is False or strategy is None else str(strategy).strip().lower()  # YAML: no -> False
        if strategy not in _SAVE_STRATEGIES:
            raise _err(source, "training.save_strategy", f"unknown value {train['save_strategy']!r}; use one of "
                                                         f"{', '.join(_SAVE_STRATEGIES)}")
        kwargs["save_strategy"] = strategy
    if train.get("lr_scheduler_type") is not None:
        kwargs["lr_scheduler_type"] = _as_str(train["lr_scheduler_type"], "training.lr_scheduler_type", source)
    if train.get("warmup_steps") is not None:
        kwargs["warmup_steps"] = _as_float(train["warmup_steps"], "training.warmup_steps", source, minimum=0)
    if train.get("weight_decay") is not None:
        kwargs["weight_decay"] = _as_float(train["weight_decay"], "training.weight_decay", source, minimum=0)
    for key in ("bf16", "gradient_checkpointing"):
        if train.get(key) is not None:
            kwargs[key] = _as_bool(train[key], f"training.{key}", source)
    kwargs["extra_args"] = _check_training_args(train.get("args") or {}, source)

    config = TrainConfig(**kwargs)
    try:
        config.reft_config()  # builds (unattached) interventions: catches bad kwargs and ranks now
    except ReftError as exc:
        raise _err(source, "intervention", str(exc)) from None
    return config


def _check_training_args(args: Any, source: str) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise _err(source, "training.args", f"must be a mapping of TrainingArguments fields, got {args!r}")
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in args:
        if key in _RESERVED_ARGS:
            raise _err(source, f"training.args.{key}", f"set it as {_RESERVED_ARGS[key]} instead")
        if key not in fields:
            hint = difflib.get_close_matches(str(key), sorted(fields), n=1)
            raise _err(source, f"training.args.{key}", "is not a transformers.TrainingArguments field"
                       + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return dict(args)


def _read_config_file(path: Path) -> Any:
    """Parse a ``.yaml``/``.yml`` or ``.json`` file (by suffix; other suffixes are tried as YAML, then JSON)."""
    if not path.is_file():
        raise ReftConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReftConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        import yaml
    except ImportError:
        raise ReftConfigError(f"{path}: reading YAML needs PyYAML (`pip install pyyaml` or `pip install "
                              "reftlib[yaml]`); or write the config as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ReftConfigError(f"{path}: not valid YAML ({exc})") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` (value parsed as YAML when PyYAML is available, else JSON, else a string)."""
    if "=" not in text:
        raise ReftConfigError(f"--set {text!r}: use KEY=VALUE, e.g. --set training.epochs=5")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ReftConfigError(f"--set {text!r}: the key is empty")
    try:
        import yaml

        value = yaml.safe_load(raw) if raw.strip() else ""
    except ImportError:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    except Exception:  # an unparsable value is kept as the string given
        value = raw
    return parts, value


def load_train_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and validate a YAML/JSON training config file, applying ``--set KEY=VALUE`` overrides."""
    path = Path(path).expanduser()
    data = _read_config_file(path)
    if data is None:
        raise ReftConfigError(f"{path}: the file is empty; see `reftlib train --help` for an example config")
    if overrides and not isinstance(data, dict):
        raise ReftConfigError(f"{path}: the config must be a mapping of sections")
    for text in overrides:
        parts, value = _parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ReftConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return parse_train_config(data, base_dir=path.resolve().parent, source=str(path))


# =============================================================================== data files
def read_records(path: str | os.PathLike, *, what: str = "data.path") -> list[dict[str, Any]]:
    """Rows of a ``.json`` (list of objects), ``.jsonl``, ``.csv`` or ``.tsv`` file, as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReftConfigError(f"{what}: cannot read {path} ({exc})") from None
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ReftConfigError(f"{what}: {path} line {number} is not valid JSON ({exc})") from None
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReftConfigError(f"{what}: {path} is not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise ReftConfigError(f"{what}: {path} must hold a JSON list of objects, e.g. "
                                  '[{"prompt": "...", "output": "..."}]')
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ReftConfigError(f"{what}: unsupported file type {path.name!r}; use .json, .jsonl, .csv or .tsv")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ReftConfigError(f"{what}: {path} row {number} is {type(row).__name__}, not an object with columns")
    return rows


def _column(rows: list[dict[str, Any]], column: str, key: str, path: Path) -> list[str]:
    values = []
    for number, row in enumerate(rows, 1):
        if column not in row:
            raise ReftConfigError(f"{key}: {column!r} is not a column of {path} (row {number} has "
                                  f"{sorted(row)}); set {key} to the right name")
        value = row[column]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ReftConfigError(f"{path} row {number}: {column!r} is {value!r}, not a string")
        values.append(value)
    return values


def read_examples(config: TrainConfig) -> tuple[list[str], list[str]]:
    """The ``(prompts, outputs)`` of the config's data file (raw text, before any chat template)."""
    rows = read_records(config.data_path)
    if not rows:
        raise ReftConfigError(f"data.path: {config.data_path} holds no examples")
    prompts = _column(rows, config.prompt_column, "data.prompt_column", config.data_path)
    outputs = _column(rows, config.output_column, "data.output_column", config.data_path)
    return prompts, outputs


# =============================================================================== models
@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' weight-loading progress bars (the Trainer's own bar is unaffected)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for ``"default"`` (offline SmolLM2) or a local folder; never downloads.

    The tokenizer pads on the left (as batched generation needs; the training collator pads on
    its own) and has a pad token (its EOS token when it defines none).
    """
    if model in DEFAULT_MODEL_ALIASES:
        from .offline import load_default_model

        with _quiet_loading():
            loaded, tokenizer = load_default_model(dtype=_torch_dtype(dtype))
        return loaded, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if not path.is_dir():
        raise ReftConfigError(f"model {model!r} is not a local folder; use 'default' or a folder written by "
                              "save_pretrained (the CLI never downloads)")
    try:
        with _quiet_loading():
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ReftConfigError(f"cannot load a causal language model from {path}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ReftConfigError(f"cannot load the tokenizer from {path} ({exc}); save one there with "
                              "tokenizer.save_pretrained") from None
    loaded.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(loaded, "generation_config", None) is not None and tokenizer.pad_token_id is not None:
        loaded.generation_config.pad_token_id = tokenizer.pad_token_id
    return loaded, tokenizer


def _use_chat_template(requested: bool | None, tokenizer: Any, where: str) -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if requested is None:
        return has_template
    if requested and not has_template:
        raise ReftConfigError(f"{where}: chat_template is true but the model's tokenizer has no chat template; "
                              "set it to false to use the prompts as they are")
    return requested


def _format_prompts(tokenizer: Any, prompts: list[str], chat_template: bool, system_prompt: str | None) -> list[str]:
    if not chat_template:
        return list(prompts)
    from .training import apply_chat_template

    return apply_chat_template(tokenizer, prompts, system_prompt=system_prompt)


def _count(n: int) -> str:
    return f"{n:,d}"


# =============================================================================== train
def _total_steps(config: TrainConfig, n_examples: int) -> tuple[int, int]:
    """``(optimizer steps per epoch, total steps)`` as the Trainer will count them (one process)."""
    batches = math.ceil(n_examples / config.batch_size)
    per_epoch = max(batches // config.gradient_accumulation_steps + (batches % config.gradient_accumulation_steps > 0), 1)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * per_epoch)
    return per_epoch, max(total, 1)


def _describe_layers(config: TrainConfig) -> str:
    layers = ", ".join(str(x) for x in config.layers)
    kind = config.intervention_type + (f" (rank {config.rank})" if config.rank is not None else "")
    if config.split_positions:
        parsed = parse_position_spec(config.positions)
        assert parsed is not None
        return (f"{config.num_interventions} x {kind} at layer(s) {layers} {config.component}: one per layer on "
                f"the first {parsed[0]} prompt tokens, one on the last {parsed[1]} (share_weights: false)")
    return f"{config.num_interventions} x {kind} at layer(s) {layers} {config.component}, positions {config.positions}"


def train_from_config(config: TrainConfig, *, dry_run: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Load the model and data, attach the interventions, train, ``save_pretrained`` into ``output_dir``.

    Prints a short summary first (unless ``quiet``). With ``dry_run`` everything is checked and
    summarized (model loaded, interventions attached, data tokenized) but nothing is trained or
    saved. Returns a dict with the summary numbers (``trainable_parameters``, ``steps``,
    ``first_loss``, ``final_loss``, ``seconds``, ``output_dir``).
    """
    import torch
    import transformers
    from transformers import TrainingArguments

    from .model import get_reft_model
    from .training import ReftTrainerForCausalLM, make_multiple_position_supervised_data_module

    say = (lambda *a, **k: None) if quiet else print
    prompts, outputs = read_examples(config)
    model, tokenizer = load_model(config.model, config.dtype)
    chat = _use_chat_template(config.chat_template, tokenizer, config.source)
    config.chat_template = chat
    texts = _format_prompts(tokenizer, prompts, chat, config.system_prompt)

    transformers.set_seed(config.seed)  # the interventions' initialization
    try:
        reft_model = get_reft_model(model, config.reft_config())
    except ReftError as exc:
        raise ReftConfigError(f"{config.source}: intervention: {exc}") from None
    data_module = make_multiple_position_supervised_data_module(
        tokenizer, reft_model, texts, outputs, positions=config.positions, num_interventions=config.num_interventions,
        nonstop=config.nonstop, share_weights=not config.split_positions, max_length=config.max_length,
    )
    trainable = reft_model.count_parameters()
    total_params = sum(p.numel() for p in model.parameters())
    per_epoch, steps = _total_steps(config, len(prompts))
    model_name = ("SmolLM2-135M-Instruct (offline default)" if config.model == "default" else config.model)
    say(f"reftlib train {config.source}")
    say(f"  model          {model_name}: {type(model).__name__}, {_count(total_params)} parameters")
    say(f"  data           {config.data_path}: {len(prompts)} examples (chat template: {'on' if chat else 'off'})")
    say(f"  interventions  {_describe_layers(config)}")
    say(f"  trainable      {_count(trainable)} parameters ({100 * trainable / max(total_params, 1):.4f}% of the model)")
    length = f"{config.max_steps} steps" if config.max_steps > 0 else \
        f"{config.epochs:g} epoch(s) x {per_epoch} step(s) = {steps} steps"
    say(f"  training       {length}, batch {config.batch_size}, learning rate {config.learning_rate:g}")
    say(f"  output         {config.output_dir}")
    summary: dict[str, Any] = {"trainable_parameters": trainable, "steps": steps, "examples": len(prompts),
                               "output_dir": str(config.output_dir)}
    if dry_run:
        say("dry run: the config is valid; nothing was trained or saved.")
        return summary

    logging_steps = config.logging_steps or max(1, steps // 10)
    optional: dict[str, Any] = {"dataloader_pin_memory": torch.cuda.is_available()}
    if config.gradient_checkpointing:  # transformers 5 renamed it activation_checkpointing
        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        optional["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    args = TrainingArguments(
        output_dir=str(config.output_dir), num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, seed=config.seed, logging_steps=logging_steps,
        save_strategy=config.save_strategy, save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        lr_scheduler_type=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, bf16=config.bf16,
        **{"report_to": [], "dataloader_num_workers": 0, "disable_tqdm": quiet, **optional, **config.extra_args},
    )
    trainer = ReftTrainerForCausalLM(model=reft_model, processing_class=tokenizer, args=args, **data_module)
    if quiet:  # disable_tqdm swaps the progress bar for a callback that prints every log: drop it too
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    reft_model.eval()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    reft_model.save_pretrained(config.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary.update(steps=trainer.state.global_step, seconds=seconds,
                   first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None)
    record = {**config.to_record(), "result": summary, "reftlib_version": _version()}
    (config.output_dir / TRAIN_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    loss_text = f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    say(f"trained {trainer.state.global_step} steps in {seconds:.1f} s{loss_text}")
    say(f"saved to {config.output_dir}")
    example = prompts[0].replace('"', '\\"')[:60]
    say(f'try it:  reftlib generate {_shell_path(config.output_dir)} --prompt "{example}" --compare')
    return summary


def _shell_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_train_config(args.config, list(args.set or []))
    if args.output_dir:  # relative to the current folder like every output_dir, not to the config
        config.output_dir = Path(args.output_dir).expanduser().resolve()
    train_from_config(config, dry_run=args.dry_run, quiet=args.quiet)
    return 0


# =============================================================================== generate
def _read_prompts_file(path: str, column: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ReftConfigError(f"--prompts-file: file not found: {file}")
    if file.suffix.lower() in _DATA_SUFFIXES:
        rows: list[Any]
        if file.suffix.lower() == ".json":
            try:
                rows = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ReftConfigError(f"--prompts-file: {file} is not valid JSON ({exc})") from None
            if isinstance(rows, list) and all(isinstance(r, str) for r in rows):
                return rows
        rows = read_records(file, what="--prompts-file")
        return _column(rows, column, "--prompt-column", file)
    return [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_train_record(folder: Path) -> dict[str, Any]:
    path = folder / TRAIN_RECORD_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _generation_model(args: argparse.Namespace, folder: Path, record: Mapping[str, Any]) -> str:
    if args.model:
        value = args.model
        if value.lower() in DEFAULT_MODEL_ALIASES:
            return "default"
        if not Path(value).expanduser().is_dir():
            raise ReftConfigError(f"--model {value!r} is not a local model folder; use 'default' or a folder "
                                  "written by save_pretrained")
        return str(Path(value).expanduser().resolve())
    if record.get("model"):
        return str(record["model"])
    base = _saved_base_model(folder)
    if base and Path(base).is_dir():
        return base
    raise ReftConfigError(
        f"{folder} does not say which model it was trained on (no {TRAIN_RECORD_NAME}"
        + (f"; its config names {base!r}, which is not a local folder" if base else "")
        + "); pass --model default or --model PATH"
    )


def _check_interventions_folder(folder: Path) -> None:
    from .io import INDEX_NAME, WEIGHTS_NAME

    pyreft = (folder / "config.json").is_file() and any(folder.glob("intkey_*.bin"))
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file() or pyreft):
        raise ReftConfigError(f"{folder} holds no {WEIGHTS_NAME}; pass a folder written by `reftlib train` or "
                              "save_pretrained (not the base model's folder: give that one as --model)")


def _saved_base_model(folder: Path) -> str | None:
    from .io import read_adapter

    try:
        config, _ = read_adapter(folder)
    except ReftError:
        return None
    return config.get("base_model_name_or_path")


def _tokenize_left_padded(tokenizer: Any, texts: list[str], device: Any) -> dict[str, Any]:
    """Tokenize prompts exactly as the training data modules do, then pad them on the left."""
    import torch

    from .training.data import _tokenize_prompts

    ids, _, _ = _tokenize_prompts(tokenizer, texts)
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def generate_texts(reft_model: ReftModel, tokenizer: Any, texts: list[str], *, max_new_tokens: int = 64,
                   mode: str = "auto", positions: str | None = None, compare: bool = False,
                   batch_size: int = 8, **generate_kwargs: Any) -> list[tuple[str | None, str]]:
    """``(base answer or None, intervened answer)`` per formatted prompt, in batches of ``batch_size``.

    With ``compare`` every batch holds each prompt twice, once without interventions
    (``adapter_names=None`` rows) and once with the active adapter, so both come from one call.
    """
    results: list[tuple[str | None, str]] = []
    active = reft_model.active_adapters  # all of them, stacked in order, as a plain call would apply them
    adapter: str | list[str] = active[0] if len(active) == 1 else active
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, **generate_kwargs}
    kwargs.setdefault("do_sample", False)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        rows = chunk * 2 if compare else chunk
        batch = _tokenize_left_padded(tokenizer, rows, reft_model.device)
        names = [None] * len(chunk) + [adapter] * len(chunk) if compare else None
        out = reft_model.generate(**batch, unit_locations=positions, mode=mode, adapter_names=names, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        decoded = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        if compare:
            results.extend(zip(decoded[:len(chunk)], decoded[len(chunk):]))
        else:
            results.extend((None, text) for text in decoded)
    return results


def _columns(left: str, right: str, width: int) -> list[str]:
    """Two texts wrapped side by side in columns of ``width`` characters."""
    a = textwrap.wrap(left, width) or [""]
    b = textwrap.wrap(right, width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"  {x:<{width}} | {y}" for x, y in zip(a, b)]


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .model import ReftModel

    folder = Path(args.path).expanduser()
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts.extend(_read_prompts_file(args.prompts_file, args.prompt_column))
    if not prompts:
        raise ReftConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.max_new_tokens < 1:
        raise ReftConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.positions is not None:
        try:
            parse_position_spec(args.positions)
        except ReftError as exc:
            raise ReftConfigError(f"--positions: {exc}") from None
    if not folder.is_dir():
        raise ReftConfigError(f"{folder} is not a folder; pass the output_dir of `reftlib train` (or any folder "
                              "written by save_pretrained)")
    _check_interventions_folder(folder)
    record = _read_train_record(folder)
    model_name = _generation_model(args, folder, record)
    dtype = args.dtype or record.get("dtype") or "float32"
    model, tokenizer = load_model(model_name, dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    reft_model = ReftModel.from_pretrained(folder, model)
    reft_model.eval()
    requested = args.chat_template if args.chat_template is not None else record.get("chat_template")
    chat = _use_chat_template(requested, tokenizer, "--chat-template")
    system_prompt = args.system_prompt if args.system_prompt is not None else record.get("system_prompt")
    texts = _format_prompts(tokenizer, prompts, chat, system_prompt)
    extra: dict[str, Any] = {}
    if args.do_sample:
        torch.manual_seed(args.seed)
        extra.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    results = generate_texts(reft_model, tokenizer, texts, max_new_tokens=args.max_new_tokens, mode=args.mode,
                             positions=args.positions, compare=args.compare, batch_size=args.batch_size, **extra)
    if args.json:
        for prompt, (base, steered) in zip(prompts, results):
            row = {"prompt": prompt, "output": steered}
            if args.compare:
                row["base_output"] = base
            print(json.dumps(row, ensure_ascii=False))
        return 0
    width = max((shutil.get_terminal_size((120, 24)).columns - 5) // 2, 20)
    for i, (prompt, (base, steered)) in enumerate(zip(prompts, results), 1):
        print(f"[{i}] {prompt}")
        if args.compare:
            print(*_columns("base model:", "with interventions:", width), sep="\n")
            print(*_columns(base or "", steered, width), sep="\n")
        else:
            print(textwrap.indent(steered or "(empty)", "    "))
        print()
    return 0


# =============================================================================== info
def describe_folder(path: str | os.PathLike) -> dict[str, Any]:
    """What a saved interventions folder holds, without loading any model (``reftlib info``)."""
    from .io import INDEX_NAME, read_adapter

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ReftConfigError(f"{folder} is not a folder; pass a folder written by save_pretrained or reftlib train")
    subfolders: dict[str, str] = {"default": "."}
    active: list[str] = ["default"]
    if (folder / INDEX_NAME).is_file():
        try:
            index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
            subfolders = dict(index["adapters"])
            active = list(index.get("active") or list(subfolders)[:1])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ReftConfigError(f"{folder / INDEX_NAME} is corrupted ({exc})") from None
    adapters = []
    for name, sub in subfolders.items():
        config, tensors = read_adapter(folder / sub)
        rows = []
        for rep in config.get("representations", []):
            key = rep.get("name") or f"layer_{rep.get('layer')}_{rep.get('component')}"
            iv = dict(rep.get("intervention") or {})
            params = sum(t.numel() for k, t in tensors.items() if k.startswith(f"{key}."))
            rows.append({"key": key, "layer": rep.get("layer"), "component": rep.get("component"),
                         "type": iv.get("type"), "rank": iv.get("low_rank_dimension"),
                         "positions": rep.get("positions") or "all", "embed_dim": iv.get("embed_dim"),
                         "dtype": iv.get("dtype"), "parameters": params,
                         "options": {k: v for k, v in iv.items()
                                     if k not in ("type", "low_rank_dimension", "embed_dim", "dtype")}})
        extra = sum(t.numel() for k, t in tensors.items() if k.startswith("__extra__.") and t.is_floating_point())
        adapters.append({"name": name, "folder": sub, "active": name in active,
                         "base_model": config.get("base_model_name_or_path"),
                         "base_model_type": config.get("base_model_type"), "interventions": rows,
                         "parameters": sum(r["parameters"] for r in rows), "extra_parameters": extra})
    return {"path": str(folder.resolve()), "adapters": adapters, "train": _read_train_record(folder)}


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _cmd_info(args: argparse.Namespace) -> int:
    info = describe_folder(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    total = sum(a["parameters"] + a["extra_parameters"] for a in info["adapters"])
    print(f"{info['path']}: {len(info['adapters'])} adapter(s), {_count(total)} parameters")
    for adapter in info["adapters"]:
        state = "active" if adapter["active"] else "inactive"
        where = "" if adapter["folder"] == "." else f" (subfolder {adapter['folder']})"
        print(f"\nadapter {adapter['name']!r}{where}, {state}: {len(adapter['interventions'])} intervention(s), "
              f"{_count(adapter['parameters'])} parameters")
        base = adapter["base_model"] or "unknown"
        print(f"  base model: {base}" + (f" ({adapter['base_model_type']})" if adapter["base_model_type"] else ""))
        rows = [["key", "layer", "component", "type", "rank", "positions", "width", "parameters"]]
        for iv in adapter["interventions"]:
            rows.append([str(iv["key"]), str(iv["layer"]), str(iv["component"]), str(iv["type"]),
                         "-" if iv["rank"] is None else str(iv["rank"]), str(iv["positions"]),
                         str(iv["embed_dim"]), _count(iv["parameters"])])
        print(*_table(rows), sep="\n")
        for iv in adapter["interventions"]:
            options = {k: v for k, v in iv["options"].items() if v not in (None, 0.0, "linear", False, [])}
            if options:
                print(f"    {iv['key']}: " + ", ".join(f"{k}={v}" for k, v in options.items()))
        if adapter["extra_parameters"]:
            print(f"  plus {_count(adapter['extra_parameters'])} parameters of a classification head")
    train = info["train"]
    if train:
        result = train.get("result") or {}
        parts = [f"model {train.get('model')}", f"chat template {'on' if train.get('chat_template') else 'off'}"]
        if result.get("steps") is not None:
            parts.append(f"{result['steps']} steps")
        if result.get("final_loss") is not None:
            parts.append(f"final loss {result['final_loss']:.4g}")
        print(f"\ntrained with `reftlib train {train.get('config_file', '')}`: " + ", ".join(parts))
    return 0


# =============================================================================== parser
_MAIN_EPILOG = """\
examples:
  reftlib train examples/configs/emoji.yaml          # train, save into training.output_dir
  reftlib train my.yaml --set training.epochs=5      # override any config key
  reftlib generate emoji-reft --prompt "Who are you?" --compare
  reftlib info emoji-reft

Run `reftlib COMMAND --help` for the options of each command.
Exit status: 0 success, 2 usage or configuration error, 1 any other failure.
"""

_EXAMPLE_CONFIG = """\
  # emoji.yaml: teach SmolLM2 to answer in emoji
  model: default                 # offline SmolLM2-135M-Instruct, or a local model folder
  chat_template: true
  data:
    path: emoji.jsonl            # {"prompt": "Who are you?", "output": "🤖💬"} per line
  intervention:
    layers: 15                   # or [8, 15]
    component: block_output
    positions: l1                # the last prompt token
    type: loreft
    rank: 4
  training:
    output_dir: emoji-reft
    epochs: 100
    learning_rate: 4.0e-3
    batch_size: 10
"""


def _train_epilog() -> str:
    lines = ["example config (YAML; the same keys work in JSON):", _EXAMPLE_CONFIG, "config keys [defaults]:"]
    for section, keys in (("", _TOP_KEYS), ("data", _DATA_KEYS), ("intervention", _INTERVENTION_KEYS),
                          ("training", _TRAINING_KEYS)):
        if section:
            lines.append(f"  {section}:")
        indent = "    " if section else "  "
        column = 32 - len(indent)  # descriptions start at column 32 in every section
        for key, text in keys.items():
            if text.startswith("section:"):
                continue
            wrapped = textwrap.wrap(text, 100 - 32) or [""]
            lines.append(f"{indent}{key:<{column}}{wrapped[0]}")
            lines.extend(f"{indent}{'':<{column}}{more}" for more in wrapped[1:])
    lines += [
        "",
        f"intervention types: {', '.join(sorted(registered_interventions()))}",
        "Relative paths (data.path, a model folder) start at the config file's folder; training.output_dir",
        "starts at the current folder. The folder receives reft_config.json + reft_model.safetensors",
        f"(load with reftlib.ReftModel.from_pretrained) and {TRAIN_RECORD_NAME}, which `reftlib generate` reads.",
        "",
        "examples:",
        "  reftlib train examples/configs/emoji.yaml",
        "  reftlib train examples/configs/emoji.yaml --dry-run        # validate and summarize only",
        "  reftlib train my.json --set training.max_steps=20 --output-dir /tmp/quick",
    ]
    return "\n".join(lines)


_GENERATE_EPILOG = """\
The base model and the chat-template setting come from the folder's reftlib_train.json (written by
`reftlib train`); pass --model for folders saved in Python. Interventions act at the positions saved
with them (e.g. l1 = the last prompt token) unless --positions is given.

examples:
  reftlib generate emoji-reft --prompt "What is your name?"
  reftlib generate emoji-reft --prompt "Hi" --prompt "Tell me a joke." --compare
  reftlib generate emoji-reft --prompts-file questions.txt --max-new-tokens 32 --json
  reftlib generate my-reft --model ./my-model --no-chat-template --prompt "The capital of France is"
"""

_INFO_EPILOG = """\
examples:
  reftlib info emoji-reft
  reftlib info emoji-reft --json
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def build_parser() -> argparse.ArgumentParser:
    """The ``reftlib`` argument parser (subcommands ``train``, ``generate``, ``info``)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter, epilog=_MAIN_EPILOG,
        description="Train and use representation interventions (ReFT, LoFiT) on Hugging Face models.\n"
                    "Interventions are tiny trainable modules that edit hidden states at chosen layers and\n"
                    "token positions; the model's weights are never changed.",
    )
    parser.add_argument("--version", action="version", version=f"reftlib {_version()}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    train = commands.add_parser(
        "train", formatter_class=_Formatter, epilog=_train_epilog(),
        help="train interventions from a YAML/JSON config and save them",
        description="Train interventions described by a YAML or JSON config file, then save them with\n"
                    "save_pretrained into training.output_dir.",
    )
    train.add_argument("config", metavar="CONFIG", help="the config file (.yaml, .yml or .json)")
    train.add_argument("--output-dir", metavar="DIR", help="save here instead of training.output_dir")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.epochs=5 (repeatable)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, load the model and data, print the summary; do not train")
    train.add_argument("--quiet", action="store_true", help="no summary and no progress bar")
    train.set_defaults(handler=_cmd_train)

    gen = commands.add_parser(
        "generate", formatter_class=_Formatter, epilog=_GENERATE_EPILOG,
        help="generate text with saved interventions",
        description="Load saved interventions onto their base model and generate answers for prompts.",
    )
    gen.add_argument("path", metavar="FOLDER", help="a folder written by `reftlib train` or save_pretrained")
    gen.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", metavar="FILE",
                     help="prompts: a text file (one per line), a JSON list, or .jsonl/.csv with a prompt column")
    gen.add_argument("--prompt-column", default="prompt", metavar="NAME",
                     help="column of --prompts-file holding the prompts (default: prompt)")
    gen.add_argument("--model", metavar="MODEL",
                     help="'default' (offline SmolLM2) or a local model folder (default: the one it was trained on)")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    gen.add_argument("--mode", choices=_GENERATION_MODES, default="auto",
                     help="where interventions act: each at its positions, every-position ones also on generated "
                          "tokens (auto, default); the prompt positions only; every generated token; both; or "
                          "everywhere")
    gen.add_argument("--positions", metavar="SPEC", help="override the saved positions, e.g. l1 or f3+l3")
    gen.add_argument("--compare", action="store_true",
                     help="also generate with the base model and print both side by side")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap prompts with the tokenizer's chat template (default: as in training)")
    gen.add_argument("--system-prompt", metavar="TEXT", help="system turn for the chat template")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling top-p (default: 0.9)")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    gen.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per batch (default: 8)")
    gen.add_argument("--dtype", choices=_DTYPES, help="model dtype (default: as in training, else float32)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(handler=_cmd_generate)

    info = commands.add_parser(
        "info", formatter_class=_Formatter, epilog=_INFO_EPILOG,
        help="show what a saved interventions folder contains",
        description="Print the adapters, layers, components, types, positions and parameter counts of a\n"
                    "folder written by save_pretrained (no model is loaded).",
    )
    info.add_argument("path", metavar="FOLDER", help="a folder written by `reftlib train` or save_pretrained")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reftlib`` command line and return its exit status (0, 1 or 2; see the module docs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except ReftError as exc:
        print(f"reftlib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reftlib {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # any other failure: show where it happened
        traceback.print_exc()
        print(f"reftlib {args.command}: failed (traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
