"""Serving throughput on vLLM: reftlib adapters vs the base model, vLLM multi-LoRA and reftlib's HF ``generate``.

Usage (in the environment that has vLLM, e.g. ``.venv-vllm``; see ``docs/serving.md``)::

    python benchmarks/serving.py [--model PATH] [--dtype fp32|bf16] [--quick] [--requests 64]
        [--new-tokens 32] [--rounds 3] [--counts 1 8 64] [--update-docs] [--json FILE]

Every configuration generates greedily a fixed number of new tokens per request (``min_tokens`` =
``max_tokens``, ``ignore_eos=True``) for the same ``--requests`` chat-templated questions, sent as
one ``generate`` call; output tokens/s = requests x new tokens / wall time of the call (prefill
included). Configurations:

* **vLLM base**: no adapter, in the reftlib engine (a :class:`~reftlib.serving.ReftLLM` with
  every adapter below loaded: its hooks are installed, base requests get no edits). The engine is
  compiled where reftlib compiles it (vLLM's CPU platform: ``torch.compile`` with inductor, the
  hooks traced in), eager with ``--eager`` or on other platforms.
* **reftlib LoReFT x N** (N in ``--counts``): N distinct prompt-only LoReFT adapters (rank 4,
  middle layer, ``block_output``, position ``"l1"``, random non-trivial weights), requests assigned
  to them round-robin, so one continuous batch mixes N adapters.
* **reftlib LoFiT x N**: ``--lofit`` distinct LoFiT adapters (:class:`~reftlib.HeadBiasIntervention`
  on 2 heads in each of 4 middle layers, ``head_output``, every position), round-robin.
* **vLLM multi-LoRA x N** (a second engine, ``enable_lora=True``, ``max_loras`` = the largest
  count, ``max_lora_rank=8``): PEFT LoRA adapters (r=8, alpha 16, ``q_proj`` and ``v_proj``, random
  weights), one ``LoRARequest`` per request, round-robin; plus the base model in that engine.
* **reftlib HF generate**: ``ReftModel.generate`` with one LoReFT adapter (the first of the above)
  on the first ``--hf-batch`` questions, left-padded, KV cache, in this process on ``--device``.

Both engines and the HF model stay loaded for the whole run, so every configuration is measured
in the same rounds: each round runs all of them back to back in an order that rotates every round,
after a short untimed warm-up call each (2 new tokens). Tables give medians of tokens/s and
medians of per-round paired tokens/s ratios. The LoRA engine runs eager (vLLM's CPU platform
turns compilation off with LoRA; elsewhere ``enforce_eager`` is set so that its base row is the
eager reference). No engine uses prefix caching (every round would otherwise serve the prompts
from the cache of the previous one).

CPU threads: vLLM's CPU worker binds its OpenMP threads to the machine's cores less
``VLLM_CPU_NUM_OF_RESERVED_CPU`` (vLLM keeps one core for its scheduler by default, half of a
2-core machine), while the HF row uses every core. So that both sides compute on the same cores,
the benchmark sets ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` unless it is set; the machine line says
what was used.

vLLM picks its own platform (CPU with the ``vllm-cpu`` build, else CUDA); ``--device`` is only for
the HF row. LoRA adapters are written with ``peft``'s ``save_pretrained`` when peft is installed,
else in the same file format directly (``adapter_config.json`` + ``adapter_model.safetensors``). If
an engine or a configuration fails, the table says so with the error instead of a number.

The default run took about 11 minutes on 2 quiet CPU cores, the start-ups of the compiled reftlib
engine (75 s) and of the LoRA engine (20 s) included (``--quick``: about 3 minutes). Engine processes are started with
spawn, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # first: may set OMP_WAIT_POLICY before torch is imported
import torch

import reftlib

REFT_RANK, LORA_RANK = 4, 8
BASE = "vLLM base"
LORA_BASE = "vLLM base (LoRA engine)"
HF = "reftlib HF generate"
# Framings of common.QUESTIONS: 8 x 8 distinct prompts of varied lengths.
FRAMES = [
    "{q}",
    "Briefly: {q}",
    "Explain it to a ten-year-old: {q}",
    "{q} Answer in three sentences.",
    "I have a question for you. {q}",
    "{q} Please give an example or two.",
    "A friend asked me this and I did not know what to say: {q}",
    "{q} Keep it short and friendly.",
]


@dataclass
class Results:
    """Everything a run measured (also written as JSON)."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> engine, adapters, tokens per call
    tokens_per_s: dict[str, list[float]] = field(default_factory=dict)  # per round
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    """Print progress immediately."""
    print(message, flush=True)


def questions(n: int) -> list[str]:
    """``n`` distinct questions: :data:`common.QUESTIONS` in the framings of :data:`FRAMES`, interleaved."""
    pool = [frame.format(q=q) for frame in FRAMES for q in common.QUESTIONS]
    if n > len(pool):
        raise SystemExit(f"--requests {n}: at most {len(pool)} distinct prompts are defined")
    return pool[:n]


def error_text(exc: BaseException) -> str:
    """The first line of an exception, for the table."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


# --------------------------------------------------------------------------- adapters
def randomize(module: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    """Add ``scale``-sized Gaussian noise to every parameter: distinct, clearly non-trivial adapters."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)


def lofit_representations(config) -> list[dict[str, Any]]:
    """LoFiT offsets on 2 heads (0 and the middle one) in each of 4 layers around a third of the depth."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    step = max(layers // 10, 1)
    chosen = dict.fromkeys(min(layers // 3 + i * step, layers - 1) for i in range(4))
    return [{"layer": layer, "component": "head_output", "positions": None,
             "intervention": reftlib.HeadBiasIntervention(heads=[0, heads // 2])} for layer in chosen]


def save_reft_adapters(model, folder: Path, n_loreft: int, n_lofit: int) -> tuple[list[str], list[str]]:
    """Save ``n_loreft`` LoReFT and ``n_lofit`` LoFiT adapters (distinct random weights) in ``folder / "reft"``.

    The first LoReFT adapter is also saved alone in ``folder / "hf"``. Returns the names. The model
    gets hooks: pass a copy.
    """
    layer = model.config.num_hidden_layers // 2
    loreft = [f"loreft{i:02d}" for i in range(n_loreft)]
    lofit = [f"lofit{i:02d}" for i in range(n_lofit)]
    reft_config = reftlib.ReftConfig({"layer": layer, "component": "block_output", "positions": "l1",
                                      "intervention": reftlib.LoreftIntervention(low_rank_dimension=REFT_RANK)})
    reft_model = reftlib.get_reft_model(model, reft_config, adapter_name=loreft[0])
    for name in loreft[1:]:
        reft_model.add_adapter(name, reftlib.ReftConfig({
            "layer": layer, "component": "block_output", "positions": "l1",
            "intervention": reftlib.LoreftIntervention(low_rank_dimension=REFT_RANK)}))
    for name in lofit:
        reft_model.add_adapter(name, reftlib.ReftConfig(lofit_representations(model.config)))
    generator = torch.Generator().manual_seed(1)
    for name in loreft:
        randomize(reft_model.adapters[name], generator, 0.5)
    for name in lofit:
        randomize(reft_model.adapters[name], generator, 4.0)  # head offsets start near 0: make them steer
    reft_model.save_pretrained(folder / "reft")
    reft_model.save_pretrained(folder / "hf", selected_adapters=[loreft[0]])  # the HF row's adapter alone
    return loreft, lofit


def lora_state(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights (r=8 on q_proj and v_proj of every layer), random A and B."""
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    out = {"q_proj": hidden, "v_proj": config.num_key_value_heads * head_dim}
    state = {}
    for layer in range(config.num_hidden_layers):
        for proj, out_features in out.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{key}.lora_A.weight"] = torch.randn(LORA_RANK, hidden, generator=generator) / hidden ** 0.5
            state[f"{key}.lora_B.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) * 1e-2
    return state


def save_lora_adapters(model, folder: Path, count: int) -> list[Path]:
    """``count`` PEFT LoRA adapters (r=8, alpha 16, q_proj/v_proj), distinct random weights, one folder each.

    With peft installed: ``get_peft_model`` + ``save_pretrained`` (the model gets LoRA layers: pass a
    copy). Without: the same two files written directly.
    """
    generator = torch.Generator().manual_seed(2)
    folders = [folder / f"lora{i:02d}" for i in range(count)]
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from safetensors.torch import save_file

        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
                  "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
                  "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False,
                  "base_model_name_or_path": None, "inference_mode": True}
        for path in folders:
            path.mkdir(parents=True)
            (path / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
            save_file(lora_state(model.config, generator), str(path / "adapter_model.safetensors"))
        return folders
    peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for path in folders:
        state = lora_state(model.config, generator)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    key = name.replace(".default.weight", ".weight")
                    param.copy_(state[key])
        peft_model.save_pretrained(path)
    return folders


# --------------------------------------------------------------------------- systems
def vllm_system(generate: Callable[..., list], prompts: list[list[int]], new: int,
                per_request: list[Any] | None) -> Callable[[], int]:
    """A call that generates ``new`` tokens for every prompt and returns the number of new tokens."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True)

    def run() -> int:
        outs = generate(prompts, params, per_request)
        counts = [len(o.outputs[0].token_ids) for o in outs]
        if counts != [new] * len(prompts):
            raise RuntimeError(f"expected {new} new tokens per request, got {sorted(set(counts))}")
        return sum(counts)

    return run


def hf_system(reft_model, batch: dict[str, torch.Tensor], new: int, pad_token_id: int) -> Callable[[], int]:
    """``ReftModel.generate`` on a left-padded batch (greedy, KV cache); returns the number of new tokens."""
    rows, length = batch["input_ids"].shape

    def run() -> int:
        with torch.no_grad():
            out = reft_model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      pad_token_id=pad_token_id)
        if out.shape != (rows, length + new):
            raise RuntimeError(f"expected {rows} x {length + new} tokens, got {tuple(out.shape)}")
        return rows * new

    return run


def measure(systems: dict[str, Callable[[int], Callable[[], int]]], new: int, rounds: int,
            results: Results) -> None:
    """Warm every system up (2 new tokens), then time ``rounds`` interleaved rounds at ``new`` tokens."""
    warm = {name: make(2) for name, make in systems.items()}
    for name, fn in warm.items():
        try:
            fn()
        except Exception as exc:  # reported in the table; the others still run
            results.errors[name] = error_text(exc)
            log(f"  {name}: FAILED ({results.errors[name]})")
    live = {name: make(new) for name, make in systems.items() if name not in results.errors}
    names = list(live)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            start = time.perf_counter()
            tokens = live[name]()
            results.tokens_per_s.setdefault(name, []).append(tokens / (time.perf_counter() - start))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {results.tokens_per_s[n][-1]:.1f}" for n in names)
            + f" tok/s  (load {common.load_average()[0]:.2f})")


# --------------------------------------------------------------------------- report
def paired(results: Results, name: str, reference: str) -> list[float]:
    """Per-round tokens/s of ``name`` / tokens/s of ``reference`` (>1: ``name`` is faster)."""
    a, b = results.tokens_per_s.get(name), results.tokens_per_s.get(reference)
    return [x / y for x, y in zip(a, b)] if a and b else []


def ratio_text(values: list[float]) -> str:
    """``median`` with the range over rounds."""
    if not values:
        return "—"
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}x{spread}"


def targets(results: Results) -> list[tuple[str, str, str]]:
    """``(target, measured, status)`` for the targets at the largest adapter count."""
    n = max(results.settings["counts"])
    reft = f"reftlib LoReFT x{n}"
    rows = []
    for goal, reference, what in ((0.9, BASE, f"≥ 0.9x vLLM base ({n} adapters)"),
                                  (1.0, f"vLLM multi-LoRA x{n}", f"≥ vLLM multi-LoRA with {n} adapters"),
                                  (2.0, HF, f"≥ 2x reftlib's HF generate at batch {results.settings['hf_batch']}")):
        values = paired(results, reft, reference)
        if not values:
            missing = results.errors.get(reference) or results.errors.get(reft) or "not measured"
            rows.append((f"reftlib on vLLM {what}", f"n/a ({missing})", "not measured"))
            continue
        median = statistics.median(values)
        rows.append((f"reftlib on vLLM {what}", ratio_text(values), "met" if median >= goal else "**not met**"))
    ceiling = paired(results, BASE, HF)
    if ceiling:  # what the engine itself gains over HF generate: no adapter serving can exceed it by much
        rows.append((f"(reference) vLLM base, no adapters, vs reftlib's HF generate at batch "
                     f"{results.settings['hf_batch']}", ratio_text(ceiling), "—"))
    return rows


def render(results: Results) -> str:
    """The Markdown section for ``docs/benchmarks.md``."""
    s = results.settings
    out = [f"*Machine:* {common.describe_machine(results.machine)} vLLM {s['vllm']} on its `{s['platform']}` "
           f"platform, `VLLM_CPU_KVCACHE_SPACE={s['kv_cache']}`, "
           f"`VLLM_CPU_NUM_OF_RESERVED_CPU={s.get('reserved_cpus', 'unset')}`.", ""]
    out.append(f"*Settings:* model `{s['model']}` ({s['dtype']}); {s['requests']} chat-templated questions "
               f"({s['prompt_tokens']} prompt tokens each), {s['new_tokens']} new tokens per request (greedy, "
               f"`min_tokens` = `max_tokens`, `ignore_eos`), all sent in one `generate` call "
               f"(`max_num_seqs={s['requests']}`, no prefix caching); reftlib engine "
               f"{s.get('reft_engine', '`enforce_eager`')}, LoRA engine eager; {s['rounds']} interleaved "
               "rounds after a 2-token warm-up of each configuration. tokens/s: median over rounds; ratios: "
               "median of per-round paired ratios (range over rounds).")
    out.append("")
    header = ["configuration", "engine", "adapters", "tokens/s", "vs vLLM base"]
    rows = []
    for name, info in results.systems.items():
        if name in results.errors:
            rows.append([name, info["engine"], info["adapters"], f"failed: {results.errors[name]}", "—"])
            continue
        values = results.tokens_per_s.get(name)
        rows.append([name, info["engine"], info["adapters"],
                     common.fmt(statistics.median(values) if values else None, "{:.1f}"),
                     "1.00x" if name == BASE else ratio_text(paired(results, name, BASE))])
    out.append(common.markdown_table(header, rows))
    out.append("")
    out.append("#### Targets")
    out.append("")
    out.append(common.markdown_table(["target", "measured (median, range)", "status"], targets(results)))
    for note in results.notes:
        out += ["", f"* {note}"]
    out += ["", f"Command: `{s['command']}`"]
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    parser.add_argument("--device", default="cpu", help="device of the HF row (vLLM picks its own platform)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 requests, 8 tokens, 1 round")
    parser.add_argument("--requests", type=int, default=None, help="requests per generate call (default 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per request (default 32)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--counts", type=int, nargs="+", default=None,
                        help="adapter counts of the LoReFT and LoRA rows (default 1 8 64)")
    parser.add_argument("--lofit", type=int, default=None, help="LoFiT adapters (default 8)")
    parser.add_argument("--hf-batch", type=int, default=None, help="batch of the HF row (default 32)")
    parser.add_argument("--kv-cache-gib", type=int, default=1,
                        help="VLLM_CPU_KVCACHE_SPACE per engine when the variable is unset (default 1)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["lora", "hf"], help="parts to skip")
    parser.add_argument("--eager", action="store_true",
                        help="run the reftlib engine with enforce_eager=True (default: reftlib's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--update-docs", action="store_true",
                        help="write the tables into docs/benchmarks.md (between <!-- serving --> markers)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (16 if args.quick else 64)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.counts = sorted(set(args.counts or ([1, 4, 16] if args.quick else [1, 8, 64])))
    args.lofit = args.lofit or (4 if args.quick else 8)
    args.hf_batch = args.hf_batch or (8 if args.quick else 32)
    if args.hf_batch > args.requests:
        parser.error(f"--hf-batch {args.hf_batch} exceeds --requests {args.requests}")
    return args


def main(argv: list[str] | None = None) -> Results:
    """Run the benchmark; returns (and optionally writes) the results."""
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import vllm
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    from reftlib.offline import default_model_path
    from reftlib.serving import ReftLLM

    device, dtype = common.resolve_device(args.device), common.resolve_dtype(args.dtype)
    torch.manual_seed(0)
    model, tokenizer = common.load_model(args.model, device, dtype)
    model_path = args.model or str(default_model_path())
    texts = common.chat_prompts(tokenizer, questions(args.requests))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths = [len(p) for p in prompts]
    results = Results(
        machine=common.machine_info(device),
        settings={"model": args.model or "SmolLM2-135M-Instruct", "dtype": str(dtype).removeprefix("torch."),
                  "requests": args.requests, "new_tokens": args.new_tokens, "rounds": args.rounds,
                  "counts": args.counts, "lofit": args.lofit, "hf_batch": args.hf_batch, "quick": args.quick,
                  "prompt_tokens": f"{min(lengths)}-{max(lengths)}", "vllm": vllm.__version__,
                  "platform": current_platform.device_type,
                  "kv_cache": os.environ["VLLM_CPU_KVCACHE_SPACE"],
                  "reserved_cpus": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
                  "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv)},
    )
    if common.OPENMP_NOTE:
        results.notes.append(common.OPENMP_NOTE)
    log(common.describe_machine(results.machine))
    engine_kwargs = dict(dtype=str(dtype).removeprefix("torch."), max_model_len=max(lengths) + args.new_tokens + 8,
                         max_num_seqs=args.requests, enable_prefix_caching=False, seed=0)
    systems: dict[str, Callable[[int], Callable[[], int]]] = {}

    def add(name: str, engine: str, adapters: str, make: Callable[[int], Callable[[], int]]) -> None:
        results.systems[name] = {"engine": engine, "adapters": adapters}
        systems[name] = make

    with tempfile.TemporaryDirectory(prefix="reftlib-serving-") as tmp:
        folder = Path(tmp)
        loreft, lofit = save_reft_adapters(common.fresh_copy(model), folder, max(args.counts), args.lofit)
        log(f"saved {len(loreft)} LoReFT + {len(lofit)} LoFiT adapters; starting the reftlib engine")
        start = time.perf_counter()
        reft_engine = ReftLLM(model_path, adapters={name: folder / "reft" for name in loreft + lofit},
                              enforce_eager=args.eager, **engine_kwargs)
        compiled = not reft_engine.llm.llm_engine.vllm_config.model_config.enforce_eager
        results.settings["reft_engine"] = "compiled (`torch.compile`, inductor)" if compiled else "`enforce_eager`"
        log(f"  reftlib engine ready ({results.settings['reft_engine']}) in {time.perf_counter() - start:.0f} s")

        def reft_generate(batch, params, names):
            return reft_engine.generate(batch, params, adapters=names)

        add(BASE, "reftlib", "—", lambda new: vllm_system(reft_generate, prompts, new, None))
        for n in args.counts:
            names = [loreft[i % n] for i in range(args.requests)]
            add(f"reftlib LoReFT x{n}", "reftlib", f"{n} LoReFT (rank {REFT_RANK}, l1)",
                lambda new, names=names: vllm_system(reft_generate, prompts, new, names))
        names = [lofit[i % len(lofit)] for i in range(args.requests)]
        add(f"reftlib LoFiT x{len(lofit)}", "reftlib", f"{len(lofit)} LoFiT (8 heads, all positions)",
            lambda new: vllm_system(reft_generate, prompts, new, names))

        if "lora" not in args.skip:
            loras = save_lora_adapters(common.fresh_copy(model), folder / "lora", max(args.counts))
            requests = [LoRARequest(f"lora{i:02d}", i + 1, str(path)) for i, path in enumerate(loras)]
            lora_engine, lora_error = None, None
            log(f"saved {len(loras)} LoRA adapters; starting the LoRA engine")
            start = time.perf_counter()
            try:
                lora_engine = vllm.LLM(model=model_path, enable_lora=True, max_loras=max(args.counts),
                                       max_cpu_loras=max(args.counts), max_lora_rank=LORA_RANK, enforce_eager=True,
                                       **engine_kwargs)
                log(f"  LoRA engine ready in {time.perf_counter() - start:.0f} s")
            except Exception as exc:
                lora_error = error_text(exc)
                log(f"  LoRA engine FAILED: {lora_error}")

            def lora_generate(batch, params, per_request):
                if lora_engine is None:
                    raise RuntimeError(f"the LoRA engine did not start: {lora_error}")
                batch = [{"prompt_token_ids": ids} for ids in batch]
                return lora_engine.generate(batch, params, lora_request=per_request, use_tqdm=False)

            add(LORA_BASE, "vLLM + LoRA", "—", lambda new: vllm_system(lora_generate, prompts, new, None))
            for n in args.counts:
                per = [requests[i % n] for i in range(args.requests)]
                add(f"vLLM multi-LoRA x{n}", "vLLM + LoRA", f"{n} LoRA (r={LORA_RANK}, q/v)",
                    lambda new, per=per: vllm_system(lora_generate, prompts, new, per))

        if "hf" not in args.skip:
            reft_model = reftlib.ReftModel.from_pretrained(folder / "hf", common.fresh_copy(model)).eval()
            tokenizer.padding_side = "left"
            batch = tokenizer(texts[:args.hf_batch], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            add(HF, f"Hugging Face ({device})", f"1 LoReFT (rank {REFT_RANK}, l1), batch {args.hf_batch}",
                lambda new: hf_system(reft_model, batch, new, tokenizer.pad_token_id))

        del model
        gc.collect()
        log(f"measuring {len(systems)} configurations, {args.rounds} rounds")
        measure(systems, args.new_tokens, args.rounds, results)
    results.machine["load_end"] = common.load_average()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results.__dict__, indent=1, default=str))
    text = render(results)
    print("\n" + text, flush=True)
    if args.update_docs:
        common.replace_section(common.DOCS / "benchmarks.md", "serving", text)
    return results


if __name__ == "__main__":
    main()
