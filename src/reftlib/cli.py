"""The ``reftlib`` command line: train interventions from a config file, generate with them, inspect them.

Five commands (``reftlib COMMAND --help`` explains each)::

    reftlib train CONFIG.yaml                     # train and save_pretrained into training.output_dir
    reftlib generate FOLDER --prompt "Hi" --compare
    reftlib info FOLDER
    reftlib lofit truthfulqa|clutrr|mquake        # LoFiT end to end: heads -> offsets -> evaluation
    reftlib serve MODEL --adapter NAME=FOLDER     # vLLM's OpenAI-compatible server, adapters by model name

``python -m reftlib`` is the same program. Exit status: 0 on success, 2 for usage and
configuration errors (the :class:`~reftlib.errors.ReftError` message is printed, without a
traceback), 1 for any other failure (printed with its traceback).

This module holds the argument parser, the commands and their printed output only; the
work is done by library modules that Python code can use directly:

* :mod:`reftlib.train_config`: the training config's schema and validation (:class:`TrainConfig`);
* :mod:`reftlib.recipe`: reading config and data files, loading models, ``train_from_config``;
* :mod:`reftlib.generation`: tokenizing prompts as training does, ``generate_texts``;
* :mod:`reftlib.io`: reading saved folders (for ``reftlib info``);
* :mod:`reftlib.lofit.tasks`: ``run_lofit_task``, one LoFiT task end to end (for ``reftlib lofit``);
* :mod:`reftlib.serving.server`: ``serve``, the OpenAI-compatible server (for ``reftlib serve``).

``reftlib train --help`` lists every config key with its default. The names that lived here
before (``reftlib.cli.parse_train_config``, ``reftlib.cli.generate_texts``, ...) still work for one
release and warn with a ``DeprecationWarning`` naming their new module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import textwrap
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import generation, recipe
from .errors import ReftConfigError, ReftError
from .interventions import registered_interventions
from .model import GENERATION_MODES
from .positions import parse_position_spec
from .recipe import TRAIN_RECORD_NAME, format_prompts, resolve_chat_template
from .train_config import CONFIG_KEYS, DEFAULT_MODEL_ALIASES, DTYPES

__all__ = ["DEFAULT_MODEL_ALIASES", "LOFIT_TASKS", "TRAIN_RECORD_NAME", "build_parser", "describe_folder", "main"]

PROG = "reftlib"

# Names that moved out of this module, kept importable (with a DeprecationWarning) for one release.
_MOVED = {
    "TrainConfig": "reftlib.train_config", "parse_train_config": "reftlib.train_config",
    "load_train_config": "reftlib.recipe", "read_records": "reftlib.recipe", "read_examples": "reftlib.recipe",
    "load_model": "reftlib.recipe", "train_from_config": "reftlib.recipe",
    "generate_texts": "reftlib.generation", "tokenize_prompts": "reftlib.generation",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"reftlib.cli.{name} moved to {_MOVED[name]}.{name}; import it from there "
                      "(the old name will be removed in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'reftlib.cli' has no attribute {name!r}")


def _count(n: int) -> str:
    return f"{n:,d}"


def _version() -> str:
    from . import __version__

    return __version__


# =============================================================================== train
def _cmd_train(args: argparse.Namespace) -> int:
    config = recipe.load_train_config(args.config, list(args.set or []))
    if args.output_dir:  # relative to the current folder like every output_dir, not to the config
        config.output_dir = Path(args.output_dir).expanduser().resolve()
    recipe.train_from_config(config, dry_run=args.dry_run, quiet=args.quiet)
    return 0


# =============================================================================== generate
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
    from .io import WEIGHTS_NAME, holds_adapters

    if not holds_adapters(folder):
        raise ReftConfigError(f"{folder} holds no {WEIGHTS_NAME}; pass a folder written by `reftlib train` or "
                              "save_pretrained (not the base model's folder: give that one as --model)")


def _saved_base_model(folder: Path) -> str | None:
    from .io import read_adapter_config, saved_adapters

    saved_adapters(folder)  # a corrupted or newer index fails here, with its reason
    return read_adapter_config(folder).get("base_model_name_or_path")


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
        prompts.extend(recipe.read_prompts(args.prompts_file, args.prompt_column, what="--prompts-file",
                                           column_key="--prompt-column"))
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
    model, tokenizer = recipe.load_model(model_name, dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    reft_model = ReftModel.from_pretrained(folder, model)
    reft_model.eval()
    requested = args.chat_template if args.chat_template is not None else record.get("chat_template")
    chat = resolve_chat_template(requested, tokenizer, where="--chat-template")
    system_prompt = args.system_prompt if args.system_prompt is not None else record.get("system_prompt")
    texts = format_prompts(tokenizer, prompts, chat_template=chat, system_prompt=system_prompt)
    extra: dict[str, Any] = {}
    if args.do_sample:
        torch.manual_seed(args.seed)
        extra.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    results = generation.generate_texts(
        reft_model, tokenizer, texts, max_new_tokens=args.max_new_tokens, mode=args.mode, positions=args.positions,
        compare=args.compare, batch_size=args.batch_size, **extra)
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
    from .io import read_adapter, saved_adapters, split_extra

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ReftConfigError(f"{folder} is not a folder; pass a folder written by save_pretrained or reftlib train")
    subfolders, active = saved_adapters(folder)  # version-checked, like every read below
    adapters = []
    for name, sub in subfolders.items():
        config, saved = read_adapter(folder / sub)
        tensors, extra_tensors = split_extra(saved)
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
        extra = sum(t.numel() for t in extra_tensors.values() if t.is_floating_point())
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


# =============================================================================== lofit
#: The tasks of ``reftlib lofit`` (reftlib.lofit.TASKS, spelled out so that --help imports no torch).
LOFIT_TASKS = ("truthfulqa", "clutrr", "mquake")


def _heads_arg(text: str) -> float | int:
    """``--heads``: a fraction below 1 (``0.03``) or a whole number of heads (``8``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.03 or a number of heads, got {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def _cmd_lofit(args: argparse.Namespace) -> int:
    import torch

    from .lofit.tasks import run_lofit_task

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir or f"lofit-{args.task}").expanduser()
    say = (lambda message: None) if args.quiet else (lambda message: print(f"[lofit] {message}", file=sys.stderr))
    result = run_lofit_task(
        args.task, model=args.model, data_dir=args.data, heads=args.heads, seed=args.seed, device=device,
        dtype=args.dtype, output_dir=output_dir, max_train=args.max_train, max_eval=args.max_eval,
        eval_split=args.eval_split, epochs=args.epochs, lr=args.lr, select_epochs=args.select_epochs,
        select_lr=args.select_lr, l1=args.l1, batch_size=args.batch_size, heads_from=args.heads_from,
        random_heads=args.random_heads, eval_base=args.eval_base, progress=not args.quiet, log=say)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "per_example"}, indent=2, default=str))
        return 0
    print(f"{args.task} ({result['eval_split']}, n={result['n_eval']}), {result['heads']['k']} heads "
          f"({result['heads']['source']}), {_count(result['trainable_parameters'])} trainable parameters:")
    for name, metric in result["metrics"].items():
        base = result.get("base_metrics", {}).get(name)
        line = f"  {name:<12} {_percent(metric)}"
        print(line + (f"   (base model {_percent(base)})" if base else ""))
    print(f"wrote {output_dir}: adapter (ReftModel.from_pretrained), head_selection.json, "
          + ("heads.png, " if "heatmap" in result["files"] else "") + "results.json, results.md")
    return 0


def _percent(metric: Mapping[str, Any]) -> str:
    if metric.get("value") is None:
        return "n/a"
    err = "" if metric.get("stderr") is None else f" ± {100 * metric['stderr']:.1f}"
    return f"{100 * metric['value']:.1f}%{err}"


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serving.server import parse_adapter_specs, serve  # vLLM is optional: imported when serving

    positions = parse_adapter_specs(args.pyreft_positions or [], "--pyreft-positions", "emoji=f1+l1")
    serve(args.model, parse_adapter_specs(args.adapter or []), args.vllm_args, pyreft_positions=positions)
    return 0


_SERVE_EPILOG = """\
examples:
  reftlib serve path/to/SmolLM2-135M-Instruct --adapter emoji=runs/emoji --dtype float32 --port 8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "emoji", "messages": [{"role": "user", "content": "Hi!"}]}'

Any other option is vLLM's (`vllm serve --help`); reftlib sets the worker extension itself and, on
vLLM's CPU platform without --enforce-eager, its own model class for compiled serving (other
platforms run eager). Needs vLLM (see docs/serving.md).
"""

_LOFIT_EPILOG = """\
The three steps of LoFiT's train_script_{task}.sh in one command: (1) learn a scale on every
attention head with an L1 penalty and keep the top heads, (2) learn an offset on each kept head,
(3) evaluate: TruthfulQA MC1/MC2 (DPO training pairs), CLUTRR and MQuAKE exact match of the
greedy answer (cross-entropy training). Metrics are printed with one standard error.

The data folder (--data, else $REFTLIB_DATA, else ../shared/data next to the project) holds
  truthfulqa/fold_0_{train,val,test}_seed_42.csv, clutrr/{train,val,test}.json,
  mquake/{train,val,test}.jsonl

OUTPUT_DIR receives the offsets (reft_config.json + safetensors, load with
ReftModel.from_pretrained(OUTPUT_DIR, model) or `reftlib generate OUTPUT_DIR`), head_selection.json,
heads.png (when matplotlib is installed), results.json and results.md.

Localization ablation: --heads-from OTHER_RUN_DIR trains offsets on the heads another run selected
(e.g. CLUTRR's heads for TruthfulQA); --random-heads on as many heads drawn with --seed.

examples:
  reftlib lofit truthfulqa                                   # offline SmolLM2, all data (slow on CPU)
  reftlib lofit clutrr --max-train 64 --max-eval 100 --device cuda
  reftlib lofit mquake --model ./my-llama --heads 0.1 --dtype bf16
  reftlib lofit truthfulqa --heads-from lofit-clutrr --output-dir lofit-tqa-clutrr-heads
  reftlib lofit truthfulqa --random-heads --seed 1 --output-dir lofit-tqa-random
"""


# =============================================================================== parser
_MAIN_EPILOG = """\
examples:
  reftlib train examples/configs/emoji.yaml          # train, save into training.output_dir
  reftlib train my.yaml --set training.epochs=5      # override any config key
  reftlib generate emoji-reft --prompt "Who are you?" --compare
  reftlib info emoji-reft
  reftlib lofit clutrr --max-train 64 --max-eval 100  # LoFiT: heads -> offsets -> evaluation

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
    for section, keys in CONFIG_KEYS.items():
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
    """The ``reftlib`` argument parser (subcommands ``train``, ``generate``, ``info``, ``lofit``, ``serve``)."""
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
    gen.add_argument("--mode", choices=tuple(GENERATION_MODES), default="auto",
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
    gen.add_argument("--dtype", choices=DTYPES, help="model dtype (default: as in training, else float32)")
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

    lofit = commands.add_parser(
        "lofit", formatter_class=_Formatter, epilog=_LOFIT_EPILOG,
        help="LoFiT end to end on TruthfulQA, CLUTRR or MQuAKE: select heads, tune offsets, evaluate",
        description="Run LoFiT on one task: head selection -> offset tuning -> evaluation, then write the\n"
                    "adapter, the head heatmap and the results (JSON and Markdown) into OUTPUT_DIR.",
    )
    lofit.add_argument("task", metavar="TASK", choices=LOFIT_TASKS,
                       help=f"one of {', '.join(LOFIT_TASKS)}")
    lofit.add_argument("--model", metavar="PATH",
                       help="a local Hugging Face causal LM folder (default: the offline SmolLM2-135M-Instruct)")
    lofit.add_argument("--data", metavar="DIR", help="the data folder (default: $REFTLIB_DATA or ../shared/data)")
    lofit.add_argument("--output-dir", metavar="DIR", help="where to write everything (default: lofit-TASK)")
    lofit.add_argument("--heads", type=_heads_arg, default=0.03, metavar="H",
                       help="fraction of all heads (below 1) or number of heads (default: 0.03)")
    ablation = lofit.add_mutually_exclusive_group()
    ablation.add_argument("--heads-from", metavar="RUN_DIR",
                          help="skip head selection; use the heads saved by another run (ablation)")
    ablation.add_argument("--random-heads", action="store_true",
                          help="skip head selection; use as many heads drawn at random with --seed (ablation)")
    lofit.add_argument("--seed", type=int, default=42, help="seed for init, data order, subsets, random heads")
    lofit.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    lofit.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="(default: fp32)")
    lofit.add_argument("--max-train", type=int, metavar="N", help="use N training examples (default: all)")
    lofit.add_argument("--max-eval", type=int, metavar="N", help="score the first N examples (default: all)")
    lofit.add_argument("--eval-split", choices=("test", "val"), default="test", help="(default: test)")
    lofit.add_argument("--epochs", type=float, help="offset-tuning epochs (task default: 3)")
    lofit.add_argument("--lr", type=float, help="offset-tuning learning rate (TruthfulQA 3e-2, others 2e-2)")
    lofit.add_argument("--select-epochs", type=float, help="head-selection epochs (default: 2)")
    lofit.add_argument("--select-lr", type=float, help="head-selection learning rate (default: 5e-3)")
    lofit.add_argument("--l1", type=float, help="head-selection L1 weight (default: 1e-3)")
    lofit.add_argument("--batch-size", type=int, metavar="N", help="examples per step (default: 8)")
    lofit.add_argument("--eval-base", action="store_true", help="also score the model without offsets")
    lofit.add_argument("--json", action="store_true", help="print the results as JSON")
    lofit.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    lofit.set_defaults(handler=_cmd_lofit)

    served = commands.add_parser(
        "serve", formatter_class=_Formatter, epilog=_SERVE_EPILOG,
        help="serve a model and saved adapters with vLLM's OpenAI-compatible server",
        description="Start vLLM's OpenAI-compatible server for MODEL with saved adapters; a client picks an\n"
                    "adapter with model=NAME (model=MODEL, or its --served-model-name, is the base model).",
    )
    served.add_argument("model", metavar="MODEL", help="the base model: a local folder or a Hub id vLLM can load")
    served.add_argument("--adapter", action="append", metavar="NAME=FOLDER",
                        help="serve the adapter saved in FOLDER under NAME (repeatable); FOLDER may be a Hub id "
                             "or a pyreft checkpoint (then give --pyreft-positions)")
    served.add_argument("--pyreft-positions", action="append", metavar="NAME=SPEC",
                        help="the positions adapter NAME's pyreft checkpoint was trained at, e.g. emoji=f1+l1 "
                             "(pyreft does not save them; repeatable)")
    served.set_defaults(handler=_cmd_serve, vllm_args=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reftlib`` command line and return its exit status (0, 1 or 2; see the module docs)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and getattr(args, "command", None) == "serve":
            args.vllm_args = unknown  # vLLM's own server options
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
