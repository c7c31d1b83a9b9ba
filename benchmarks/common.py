"""Shared helpers of reftlib's benchmarks: machine description, loading, interleaved timing, memory.

Everything here is about measuring *fairly on a shared, noisy machine*:

* :func:`interleaved` runs every system once per round, rotating the order each round, so a slow
  patch of the machine hits all systems alike; the report uses medians and the median of the
  per-round (paired) ratios.
* :func:`peak_step_memory` measures the peak memory of one call. On CUDA this is
  ``torch.cuda.max_memory_allocated`` above the memory held before the call. On CPU it reads the
  allocation events of ``torch.profiler`` (``profile_memory=True``): every CPU tensor allocation
  and free is reported with the allocator's running total of bytes allocated *since profiling
  started and still alive*, so the maximum of that total is the exact peak of tensor memory the
  call added on top of what already existed (activations, gradients, temporaries; the weights
  and anything allocated before are excluded). ``tracemalloc`` cannot see torch's allocations,
  and RSS includes the allocator's cached, freed pages, so neither is used.
* :func:`machine_info` records what the numbers depend on (CPU, threads, versions, load average
  at start and end).

pyreft / pyvene are optional: :func:`import_pyreft` returns ``None`` when they are not installed.
They are meant to be installed with ``pip install --no-deps pyreft==0.1.0 pyvene==0.1.8`` next to
the current transformers (their pins are older); reftlib's benchmarks then run them unchanged, with
only the trainer shims of :mod:`emoji_training` for transformers 5.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _passive_openmp_if_loaded() -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy and the variable is unset.

    Runs when this module is imported, before it imports ``torch`` (OpenMP reads the variable
    once), so benchmark scripts import :mod:`common` before torch. With the default (active)
    policy, torch's OpenMP threads busy-wait at every parallel region; when other processes hold
    the cores that spinning collapses throughput (measured here: 2 threads at load 5 on 2 cores
    generated 1.1-1.5 tokens/s, 7-12 tokens/s with the passive policy, 8 with 1 thread). Returns
    a note to print, or ``None`` when nothing was changed.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load <= 0.75 * (os.cpu_count() or 1):
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return (f"load average {load:.1f} on {os.cpu_count()} cores: set OMP_WAIT_POLICY=PASSIVE so torch's OpenMP "
            "threads do not busy-wait against other processes (export OMP_WAIT_POLICY yourself to override)")


OPENMP_NOTE = _passive_openmp_if_loaded()

import torch  # noqa: E402 - after the OpenMP setting above

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMG = DOCS / "img"

# Prompts of the generation benchmarks: everyday questions, chat-templated by the caller.
QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Where do penguins live?",
    "Can you recommend a movie for tonight?",
    "Why is the sky blue?",
    "What is the best way to learn to code?",
    "How do plants grow?",
    "Tell me about the ocean.",
]


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: CPU/GPU, cores, threads, library versions, load average now."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "pyreft": package_version("pyreft"),
        "pyvene": package_version("pyvene"),
        "device": str(device),
        "load_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One Markdown paragraph describing ``info`` (see :func:`machine_info`)."""
    start = info.get("load_start", (0, 0, 0))
    end = info.get("load_end", start)
    where = info.get("gpu") or (f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
                                f"OMP_WAIT_POLICY {info.get('omp_wait_policy', 'default (active)')}")
    peers = ", ".join(
        f"{name} {info[name]}" for name in ("peft", "pyreft", "pyvene") if info.get(name)
    )
    head = (f"{info['date']}, {where} (device `{info['device']}`); Python {info['python']}, torch {info['torch']}, "
            f"transformers {info['transformers']}{', ' + peers if peers else ''}. ")
    if "load_note" in info:  # a run recovered from its log, which has 1-minute load readings only
        return head + info["load_note"]
    return (
        head + f"Load average (1/5/15 min) {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f} at the start and "
        f"{end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} at the end, on {info['cores']} cores"
        + " (the benchmark's own threads count in it)"
        + (": the machine was shared with other jobs; read ratios (paired, same run), not absolute times."
           if max(start[0], end[0]) - info["torch_threads"] > 0.5 else ".")
    )


# --------------------------------------------------------------------------- models
def resolve_device(name: str) -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:1"`` as a device, failing clearly when CUDA is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or torch names) as a dtype."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in names:
        raise SystemExit(f"unknown --dtype {name!r}; use fp32, bf16 or fp16")
    return names[name]


def load_model(path: str | None, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)``: the offline SmolLM2-135M-Instruct by default, else ``path`` (local only).

    The tokenizer pads on the left and has a pad token; the model is in eval mode, on ``device``.
    """
    if path is None:
        from reftlib.offline import load_default_model

        return load_default_model(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of ``model`` (each system gets its own, so hooks never leak between them)."""
    return copy.deepcopy(model)


def chat_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    """Questions wrapped in the tokenizer's chat template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q in questions]
    return list(questions)


def import_pyreft() -> tuple[types.ModuleType, types.ModuleType] | None:
    """``(pyreft, pyvene)`` if both import, else ``None``.

    pyvene imports ``matplotlib.pyplot`` at module level (never used by ReFT); a stub is inserted
    only when matplotlib is missing.
    """
    try:
        import matplotlib.pyplot  # noqa: F401
    except ModuleNotFoundError:
        mpl = types.ModuleType("matplotlib")
        mpl.pyplot = types.ModuleType("matplotlib.pyplot")
        sys.modules.setdefault("matplotlib", mpl)
        sys.modules.setdefault("matplotlib.pyplot", mpl.pyplot)
    try:
        import pyreft
        import pyvene
    except Exception:  # any import failure means "not available"
        return None
    return pyreft, pyvene


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (synchronized before and after on CUDA)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timings:
    """Per-system lists of seconds, one entry per round (rounds are aligned across systems)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        values = self.seconds.get(name)
        return statistics.median(values) if values else None

    def paired_ratios(self, name: str, reference: str) -> list[float]:
        """Per-round ``time(reference) / time(name)`` (speed ratios; >1 = ``name`` faster)."""
        a, b = self.seconds.get(name), self.seconds.get(reference)
        if not a or not b:
            return []
        return [y / x for x, y in zip(a, b)]

    def paired_ratio(self, name: str, reference: str) -> float | None:
        """Median over rounds of ``time(reference) / time(name)`` (a speed ratio; >1 = ``name`` faster)."""
        ratios = self.paired_ratios(name, reference)
        return statistics.median(ratios) if ratios else None


def interleaved(systems: dict[str, Callable[[], Any]], rounds: int, device: torch.device, *,
                warmup: int = 1, log: Callable[[str], None] = print) -> Timings:
    """Time each system ``rounds`` times, interleaved, after ``warmup`` untimed calls each.

    The order rotates every round. A system that raises is dropped and its error recorded.
    """
    timings = Timings()
    names = list(systems)
    for name in names:
        try:
            for _ in range(warmup):
                systems[name]()
        except Exception as exc:  # reported in the results; the others still run
            timings.errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  {name}: FAILED ({timings.errors[name]})")
    live = [n for n in names if n not in timings.errors]
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for name in order:
            timings.seconds.setdefault(name, []).append(timed(systems[name], device))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {timings.seconds[n][-1]:.3f}s" for n in live)
            + f"  (load {load_average()[0]:.2f})")
    return timings


# --------------------------------------------------------------------------- memory
def peak_step_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensor memory that one call of ``fn`` allocates on top of what already exists.

    CUDA: ``max_memory_allocated`` minus the memory allocated before the call. CPU: the maximum
    of the CPU allocator's running total reported to ``torch.profiler`` (see the module notes).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def _walk(nodes) -> Iterator[Any]:
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def profile_step(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """``(peak bytes, attention backward kernels)`` of one call of ``fn``, from one profiled run.

    The peak is measured as in :func:`peak_step_memory`. The kernel count is the number of
    profiler events named ``aten::*attention*backward`` (SDPA's CPU, flash and memory-efficient
    kernels), i.e. how many decoder layers the backward pass goes through.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=device.type == "cpu") as prof:
        fn()
        synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = 0
        for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                peak = max(peak, node.extra_fields.total_allocated)
    kernels = sum(1 for e in prof.events()
                  if e.name.startswith("aten::") and "attention" in e.name and e.name.endswith("backward"))
    return peak, kernels


def trainable_state_bytes(params: Sequence[torch.nn.Parameter]) -> int:
    """Persistent memory of training ``params`` with Adam: the values plus two moment buffers."""
    return 3 * sum(p.numel() * p.element_size() for p in params)


# --------------------------------------------------------------------------- reporting
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (or append it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def fmt(value: float | None, pattern: str = "{:.2f}", missing: str = "n/a") -> str:
    """Format a number, or ``missing`` for ``None``."""
    return missing if value is None else pattern.format(value)
