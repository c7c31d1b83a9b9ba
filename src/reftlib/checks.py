"""Argument checks for reftlib's entry points: the wrong kind of object fails at the door.

Passing a model name where a loaded model belongs, a model where the tokenizer belongs, or ``None``
would otherwise fail deep inside (an ``AttributeError`` from a hook, a ``TypeError`` from
``transformers``). Each function here checks one kind of argument and raises an
:class:`~reftlib.errors.ArgumentTypeError` (a :class:`~reftlib.errors.ReftConfigError` and a
``TypeError``) that names the call, the argument, what it expects, what it got and, where it helps,
how to get the right object::

    ReftTrainerForCausalLM(model=...) expects a ReftModel (from reftlib.get_reft_model), got str 'gpt2'

Every check returns its argument (unchanged, except :func:`require_str_list`, which returns a list),
so it can be used inline: ``model = require_model(model, "model", "select_heads")``.

This module imports nothing heavy and nothing else from reftlib (but :mod:`reftlib.errors`), so any
module (:mod:`reftlib.model` included) can use it. It recognizes a ReftModel through the class that
:mod:`reftlib.model` registers with :func:`register_reft_model_class` when it is imported (anyone
holding a ReftModel has imported it), so the layering stays one-way: checks never import the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

from .errors import ArgumentTypeError, InputError, ReftError

if TYPE_CHECKING:
    from .model import ReftModel

__all__ = [
    "describe",
    "register_reft_model_class",
    "registered_reft_model_class",
    "require_instance",
    "require_model",
    "require_processing_class",
    "require_reft_model",
    "require_str_list",
    "require_tokenizer",
    "unwrap_model",
]

T = TypeVar("T")

_REFT_MODEL = "a ReftModel (from reftlib.get_reft_model)"
_HF_MODEL = "a Hugging Face model (e.g. AutoModelForCausalLM.from_pretrained(...))"
_TOKENIZER = "a tokenizer (e.g. AutoTokenizer.from_pretrained(...))"

_reft_model_classes: list[type] = []  # filled by reftlib.model when it is imported


def register_reft_model_class(cls: type) -> type:
    """Record ``cls`` as the ReftModel class the checks recognize (its subclasses are recognized too).

    :mod:`reftlib.model` calls this right after defining :class:`~reftlib.ReftModel`, so this module
    can test ``isinstance`` without importing the model (which imports this module). Returns ``cls``.
    """
    if not isinstance(cls, type):
        raise ArgumentTypeError(f"register_reft_model_class(cls=...) expects a class, got {describe(cls)}")
    if cls not in _reft_model_classes:
        _reft_model_classes.append(cls)
    return cls


def registered_reft_model_class() -> type[ReftModel]:
    """The class registered first with :func:`register_reft_model_class`: :class:`reftlib.ReftModel`.

    Loading functions outside :mod:`reftlib.model` (e.g. :func:`reftlib.io.load_reft_model`) build
    this class by default without importing the model module.
    """
    if not _reft_model_classes:  # only reachable if reftlib.model failed to import
        raise ReftError("no ReftModel class is registered; import reftlib (or reftlib.model) first")
    return _reft_model_classes[0]


def describe(obj: Any) -> str:
    """A short description of what was passed, for error messages: ``None``, ``str 'gpt2'``, ``Linear``."""
    if obj is None:
        return "None"
    name = type(obj).__name__
    if isinstance(obj, (str, bytes)):
        text = repr(obj)
        return f"{name} {text if len(text) <= 60 else text[:57] + '...'}"
    return name


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _error(where: str, argument: str, expected: str, obj: Any, hint: str | None = None) -> ArgumentTypeError:
    message = f"{where}({argument}=...) expects {expected}, got {describe(obj)}"
    return ArgumentTypeError(f"{message}; {hint}" if hint else message)


def _is_reft_model(obj: Any) -> bool:
    return isinstance(unwrap_model(obj), tuple(_reft_model_classes))


def _looks_like_tokenizer(obj: Any) -> bool:
    if obj is None or isinstance(obj, (str, bytes, int, float, nn.Module)) or not callable(obj):
        return False
    return hasattr(obj, "convert_tokens_to_ids") or hasattr(obj, "encode")


def require_instance(obj: Any, cls: type[T] | tuple[type, ...], argument: str, where: str, expected: str, *,
                     optional: bool = False, hint: str | None = None) -> T:
    """``obj`` when it is an instance of ``cls`` (or ``None`` with ``optional``); else an :class:`ArgumentTypeError`.

    ``expected`` is the phrase used in the message (``"a ReftConfig"``, ``"a TrainingArguments"``).
    """
    if (obj is None and optional) or isinstance(obj, cls):
        return obj  # type: ignore[return-value]
    raise _error(where, argument, expected, obj, hint)


def require_model(obj: Any, argument: str, where: str, *, optional: bool = False,
                  allow_reft_model: bool = False) -> nn.Module:
    """``obj`` when it is a Hugging Face model: an ``nn.Module`` with a ``config`` (a ``PeftModel`` is one too).

    A :class:`~reftlib.ReftModel` is accepted only with ``allow_reft_model`` (functions that read
    the base model's config through it); elsewhere the message says to pass ``reft_model.model``.
    A plain ``nn.Module`` without ``config`` is refused: reftlib finds the layers, heads and
    maximum length through the model's config. ``optional`` accepts ``None``.
    """
    if obj is None and optional:
        return obj
    if _is_reft_model(obj):
        if allow_reft_model:
            return obj
        raise _error(where, argument, _HF_MODEL + ", not a ReftModel", obj,
                     "pass the base model (reft_model.model), or call reft_model.detach() to get it back clean")
    if isinstance(obj, nn.Module) and getattr(obj, "config", None) is not None:
        return obj
    if isinstance(obj, (str, bytes)):
        hint = "load the model first, e.g. AutoModelForCausalLM.from_pretrained(name)"
    elif isinstance(obj, nn.Module):
        hint = "it is an nn.Module without a .config; reftlib finds the layers through the model's config"
    elif _looks_like_tokenizer(obj):
        hint = "that is a tokenizer; check the order of the arguments (model, then tokenizer)"
    else:
        hint = None
    raise _error(where, argument, _HF_MODEL, obj, hint)


def require_reft_model(obj: Any, argument: str, where: str, *, cls: type | None = None,
                       expected: str | None = None, optional: bool = False) -> ReftModel:
    """``obj`` when it is a :class:`~reftlib.ReftModel` (or an instance of ``cls``), possibly wrapped by DDP or
    ``torch.compile``; else an :class:`ArgumentTypeError` that says how to build one.

    ``expected`` replaces the default phrase (``"a ReftModel (from reftlib.get_reft_model)"``),
    e.g. for :class:`~reftlib.training.ReftModelForSequenceClassification`.
    """
    if obj is None and optional:
        return obj
    if cls is None:
        cls = tuple(_reft_model_classes)
    if isinstance(unwrap_model(obj), cls):
        return obj
    if isinstance(obj, nn.Module) and getattr(obj, "config", None) is not None and not _is_reft_model(obj):
        hint = "wrap the model first: reftlib.get_reft_model(model, config)"
    elif isinstance(obj, (str, bytes)):
        hint = "load the base model, then reftlib.get_reft_model(model, config) or ReftModel.from_pretrained(path, model)"
    else:
        hint = None
    raise _error(where, argument, expected or _REFT_MODEL, obj, hint)


def require_tokenizer(obj: Any, argument: str, where: str, *, optional: bool = False) -> Any:
    """``obj`` when it looks like a tokenizer (or a processor holding one): callable, with ``encode`` or
    ``convert_tokens_to_ids``, and not a model; ``optional`` accepts ``None``."""
    if obj is None and optional:
        return obj
    if _looks_like_tokenizer(obj) or _looks_like_tokenizer(getattr(obj, "tokenizer", None)):
        return obj
    if isinstance(obj, nn.Module):
        hint = "that is a model; check the order of the arguments"
    elif isinstance(obj, (str, bytes)):
        hint = "load it first, e.g. AutoTokenizer.from_pretrained(name)"
    else:
        hint = None
    raise _error(where, argument, _TOKENIZER, obj, hint)


def require_processing_class(obj: Any, argument: str, where: str) -> Any:
    """``obj`` when it can be a ``Trainer``'s ``processing_class``: ``None``, a tokenizer, a processor, an image
    processor or a feature extractor (anything with ``save_pretrained`` that is not a model)."""
    if obj is None or (hasattr(obj, "save_pretrained") and not isinstance(obj, nn.Module)) \
            or _looks_like_tokenizer(obj):
        return obj
    if isinstance(obj, nn.Module):
        hint = "that is a model; pass it as model= and the tokenizer as processing_class="
    elif isinstance(obj, (str, bytes)):
        hint = "load it first, e.g. AutoTokenizer.from_pretrained(name)"
    else:
        hint = None
    raise _error(where, argument, "a tokenizer or processor (e.g. AutoTokenizer.from_pretrained(...))", obj, hint)


def require_str_list(obj: Any, argument: str, where: str, *, allow_empty: bool = False) -> list[str]:
    """``obj`` as a ``list[str]``: any iterable of strings (list, tuple, ``datasets`` column), not one string.

    A wrong container is an :class:`ArgumentTypeError`; an element that is not a string, or an
    empty list (unless ``allow_empty``), is an :class:`~reftlib.errors.InputError` naming its index.
    """
    if isinstance(obj, (str, bytes)):
        raise _error(where, argument, "a list of strings", obj, f"wrap a single text in a list: [{argument}]")
    if obj is None or isinstance(obj, nn.Module) or not isinstance(obj, Iterable):
        raise _error(where, argument, "a list of strings", obj)
    items = list(obj)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(f"{where}({argument}=...): {argument}[{i}] is {describe(item)}, not a string")
    if not items and not allow_empty:
        raise InputError(f"{where}({argument}=...) is empty; pass at least one string")
    return items
