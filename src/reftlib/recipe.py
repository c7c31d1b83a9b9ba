"""Running a ``reftlib train`` config: read the files, load the model, train, save.

This is the training recipe behind ``reftlib train``, usable from Python too::

    from reftlib.recipe import load_train_config, train_from_config

    config = load_train_config("examples/configs/emoji.yaml", ["training.max_steps=20"])
    summary = train_from_config(config)  # saves into config.output_dir

* :func:`load_train_config` reads a YAML/JSON file and validates it with
  :func:`reftlib.train_config.parse_train_config` (the schema lives there).
* :func:`read_records`, :func:`read_examples` and :func:`read_prompts` read the data files
  (``.json``, ``.jsonl``, ``.csv``, ``.tsv``; prompts also from plain text).
* :func:`load_model` loads ``"default"`` (the offline SmolLM2-135M-Instruct) or a local folder,
  never downloading, with a left-padding tokenizer that has a pad token.
* :func:`resolve_chat_template` and :func:`format_prompts` decide and apply the chat template
  the same way for training and for ``reftlib generate``.
* :func:`train_from_config` attaches the interventions, trains with
  :class:`~reftlib.training.ReftTrainerForCausalLM` and writes ``save_pretrained`` output plus
  :data:`TRAIN_RECORD_NAME` (the run's settings, read by ``reftlib generate`` and ``reftlib info``).

Errors in the files or settings are :class:`~reftlib.errors.ReftConfigError`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ReftConfigError, ReftError
from .offline import load_model
from .train_config import DATA_SUFFIXES, TrainConfig, parse_train_config

if TYPE_CHECKING:
    pass

__all__ = [
    "TRAIN_RECORD_NAME",
    "format_prompts",
    "load_model",
    "load_train_config",
    "read_examples",
    "read_prompts",
    "read_records",
    "resolve_chat_template",
    "train_from_config",
]

#: Written next to the interventions by ``reftlib train``; ``reftlib generate`` reads its model and
#: chat-template settings so that ``reftlib generate FOLDER --prompt ...`` needs nothing else.
TRAIN_RECORD_NAME = "reftlib_train.json"


# --------------------------------------------------------------------------- config files
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


# --------------------------------------------------------------------------- data files
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


def read_prompts(path: str | os.PathLike, column: str = "prompt", *, what: str = "prompts file",
                 column_key: str = "column") -> list[str]:
    """Prompts from a file: a text file (one per non-empty line), a JSON list of strings, or records.

    Records (``.json`` list of objects, ``.jsonl``, ``.csv``, ``.tsv``) give their ``column``.
    Errors start with ``what`` (e.g. ``--prompts-file``) and name ``column_key`` for a missing column.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ReftConfigError(f"{what}: file not found: {file}")
    if file.suffix.lower() in DATA_SUFFIXES:
        if file.suffix.lower() == ".json":
            try:
                rows = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ReftConfigError(f"{what}: {file} is not valid JSON ({exc})") from None
            if isinstance(rows, list) and all(isinstance(r, str) for r in rows):
                return rows
        return _column(read_records(file, what=what), column, column_key, file)
    return [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_examples(config: TrainConfig) -> tuple[list[str], list[str]]:
    """The ``(prompts, outputs)`` of the config's data file (raw text, before any chat template)."""
    rows = read_records(config.data_path)
    if not rows:
        raise ReftConfigError(f"data.path: {config.data_path} holds no examples")
    prompts = _column(rows, config.prompt_column, "data.prompt_column", config.data_path)
    outputs = _column(rows, config.output_column, "data.output_column", config.data_path)
    return prompts, outputs


# --------------------------------------------------------------------------- models
def resolve_chat_template(requested: bool | None, tokenizer: Any, *, where: str = "chat_template") -> bool:
    """Whether to wrap prompts with the tokenizer's chat template: ``requested``, or (None) whether it has one.

    Asking for the template when the tokenizer has none raises a
    :class:`~reftlib.errors.ReftConfigError` that starts with ``where`` (the setting's name).
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if requested is None:
        return has_template
    if requested and not has_template:
        raise ReftConfigError(f"{where}: chat_template is true but the model's tokenizer has no chat template; "
                              "set it to false to use the prompts as they are")
    return requested


def format_prompts(tokenizer: Any, prompts: Sequence[str], *, chat_template: bool,
                   system_prompt: str | None = None) -> list[str]:
    """The prompts as they are, or each wrapped as a user turn (after ``system_prompt``) by the chat template.

    Training (:func:`train_from_config`) and ``reftlib generate`` format prompts with this one
    function, so a trained intervention sees the same text at generation time.
    """
    if not chat_template:
        return list(prompts)
    from .training import apply_chat_template

    return apply_chat_template(tokenizer, prompts, system_prompt=system_prompt)


# --------------------------------------------------------------------------- training
def _thousands(n: int) -> str:
    return f"{n:,d}"


def _total_steps(config: TrainConfig, n_examples: int) -> tuple[int, int]:
    """``(optimizer steps per epoch, total steps)`` as the Trainer will count them (one process)."""
    batches = math.ceil(n_examples / config.batch_size)
    per_epoch = max(batches // config.gradient_accumulation_steps + (batches % config.gradient_accumulation_steps > 0), 1)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * per_epoch)
    return per_epoch, max(total, 1)


def _describe_layers(config: TrainConfig) -> str:
    layers = ", ".join(str(x) for x in config.layers)
    kind = config.intervention_type + (f" (rank {config.rank})" if config.rank is not None else "")
    halves = config.position_halves
    if halves is not None:
        return (f"{config.num_interventions} x {kind} at layer(s) {layers} {config.component}: one per layer on "
                f"the first {halves[0][1:]} prompt tokens, one on the last {halves[1][1:]} (share_weights: false)")
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
    chat = resolve_chat_template(config.chat_template, tokenizer, where=config.source)
    config.chat_template = chat
    texts = format_prompts(tokenizer, prompts, chat_template=chat, system_prompt=config.system_prompt)

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
    say(f"  model          {model_name}: {type(model).__name__}, {_thousands(total_params)} parameters")
    say(f"  data           {config.data_path}: {len(prompts)} examples (chat template: {'on' if chat else 'off'})")
    say(f"  interventions  {_describe_layers(config)}")
    say(f"  trainable      {_thousands(trainable)} parameters ({100 * trainable / max(total_params, 1):.4f}% of the model)")
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
