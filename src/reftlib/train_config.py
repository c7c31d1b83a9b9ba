"""The ``reftlib train`` config: its schema and validation (no model or data is loaded here).

A training config is a small YAML or JSON mapping with a top level (``model``, ``dtype``,
``chat_template``, ``system_prompt``) and three sections (``data``, ``intervention``,
``training``). :func:`parse_train_config` validates an already-parsed mapping
(:func:`reftlib.recipe.load_train_config` reads a file, applying ``--set KEY=VALUE`` overrides)
and returns a :class:`TrainConfig` whose paths are resolved and whose interventions were
test-built, so a bad rank or keyword fails before any model is loaded. Every error is a
:class:`~reftlib.errors.ReftConfigError` naming the file, the key and what is allowed.

:data:`CONFIG_KEYS` lists every key with its help text and default; validation and
``reftlib train --help`` read the same table, so the documentation cannot drift from what is
accepted. Running a config (loading the model and data, training, saving) is
:func:`reftlib.recipe.train_from_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import COMPONENTS, ReftConfig
from .errors import ReftConfigError, ReftError
from .interventions import intervention_class, registered_interventions
from .offline import DEFAULT_MODEL_ALIASES
from .positions import parse_position_spec, split_position_spec

__all__ = [
    "CONFIG_KEYS",
    "DATA_SUFFIXES",
    "DEFAULT_MODEL_ALIASES",
    "DTYPES",
    "TrainConfig",
    "parse_train_config",
]

#: ``model`` values meaning the offline SmolLM2-135M-Instruct of :mod:`reftlib.offline`.

#: Model dtypes a config (and ``reftlib generate --dtype``) may name.
DTYPES = ("float32", "bfloat16", "float16")
_SAVE_STRATEGIES = ("no", "steps", "epoch")
#: File types :func:`reftlib.recipe.read_records` reads (``data.path`` must have one of them).
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")

# Every config key, by section, with the help text shown by `reftlib train --help`. Validation uses the
# same tables, so the documentation cannot drift from what is accepted.
_TOP_KEYS: dict[str, str] = {
    "model": "'default' (SmolLM2-135M-Instruct, offline) or a local Hugging Face model folder [default]",
    "dtype": f"model dtype: one of {', '.join(DTYPES)} [float32]",
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
#: Every config key by section (``""`` = the top level) with its help text and ``[default]``;
#: ``"section: ..."`` entries name the sections.
CONFIG_KEYS: dict[str, dict[str, str]] = {"": _TOP_KEYS, "data": _DATA_KEYS, "intervention": _INTERVENTION_KEYS,
                                          "training": _TRAINING_KEYS}
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
    def position_halves(self) -> tuple[str, str] | None:
        """``("f<n>", "l<m>")`` when each layer gets two interventions (``f`` and ``l`` parts), else None.

        The rule is :func:`reftlib.positions.split_position_spec`'s, the one the data modules follow.
        """
        return split_position_spec(self.positions, self.share_weights)

    @property
    def split_positions(self) -> bool:
        """Whether each layer gets two interventions (``f`` part and ``l`` part, ``share_weights: false``)."""
        return self.position_halves is not None

    def representation_positions(self) -> list[str]:
        """The default positions stored with each intervention, in config order.

        With split positions (``"f3+l3"``, ``share_weights: false``) the layers are listed twice: the
        first copy acts on the first tokens (``"f3"``), the second on the last tokens (``"l3"``), which is
        what the data module gives them during training.
        """
        halves = self.position_halves
        if halves is None:
            return [self.positions] * len(self.layers)
        return [halves[0]] * len(self.layers) + [halves[1]] * len(self.layers)

    def reft_config(self) -> ReftConfig:
        """A fresh :class:`~reftlib.ReftConfig` (new, unbuilt interventions) for this config."""
        positions = self.representation_positions()
        layers = self.layers * (len(positions) // len(self.layers))
        reps = []
        for layer, spec in zip(layers, positions):
            kwargs = dict(self.intervention_kwargs)
            if self.rank is not None:
                kwargs["low_rank_dimension"] = self.rank
            reps.append({"layer": layer, "component": self.component, "positions": spec,
                         "intervention": self.intervention_type, "intervention_kwargs": kwargs})
        return ReftConfig(representations=reps)

    @property
    def num_interventions(self) -> int:
        """How many interventions the config attaches: one per layer, two with split positions."""
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
        if dtype not in DTYPES:
            raise _err(source, "dtype", f"unknown dtype {top['dtype']!r}; use one of {', '.join(DTYPES)}")
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
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise _err(source, "data.path", f"{path.name!r} has an unsupported suffix; use one of {', '.join(DATA_SUFFIXES)}")
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
