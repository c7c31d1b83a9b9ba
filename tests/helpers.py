"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import reftlib


def randomize(reft_model: reftlib.ReftModel, scale: float = 0.5, seed: int = 1) -> None:
    """Give every intervention parameter a clearly non-trivial value (fresh ones are near identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in reft_model.adapters.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)


def capture_site(model, site, kind=None):
    """Register a hook (after reftlib's) that records the site tensor; returns (store, handle)."""
    store = {}
    kind = kind or site.kind
    if kind == "input":
        def pre(module, args, kwargs):
            store["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handle = site.module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module, args, output):
            out = output if isinstance(output, torch.Tensor) else output[0]
            store["x"] = out.detach().clone()
        handle = site.module.register_forward_hook(post)
    return store, handle


def make_intervention(component: str, rank: int = 2):
    if component == "head_output":
        return reftlib.HeadBiasIntervention(heads=[0, 2])
    return reftlib.LoreftIntervention(low_rank_dimension=rank)


def assert_close_to_scale(actual: dict, expected: dict, rel: float, what: str) -> None:
    """Each tensor within ``rel`` times its own largest entry (weights near 0 carry no relative precision)."""
    assert actual.keys() == expected.keys(), what
    for key in expected:
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(actual[key], expected[key], atol=rel * scale, rtol=0, msg=f"{what}: {key}")


def run_torchrun(script, out, nproc: int = 2, timeout: int = 240) -> dict[int, dict]:
    """Run ``script out`` under torchrun on ``nproc`` local gloo processes; the ``rank*.json`` reports by rank.

    The test modules that launch such jobs share the pytest-xdist group ``"torchrun"`` (``make test``
    runs with ``--dist loadgroup``): on a small machine two concurrent jobs of 2 processes each
    oversubscribe the cores, and DeepSpeed's CPU communication uses named shared memory.

    The script writes one ``rank<r>.json`` (with ``rank`` and ``world_size``) into ``out``.
    """
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(out),
    ]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun timed out:\n{exc.stdout}\n{exc.stderr}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in Path(out).glob("rank*.json"))}
    assert set(ranks) == set(range(nproc)) and all(r["world_size"] == nproc for r in ranks.values())
    return ranks


def write_pyreft_folder(folder: Path, entries: list[dict], *, dim: int, rank: int, legacy: bool = False,
                        sorted_keys: bool = True) -> list[str]:
    """Write ``config.json`` + ``intkey_*.bin`` the way pyvene's ``IntervenableModel.save`` does.

    Each entry: ``{"class": "LoreftIntervention", "state": {...}, "layer": 1, "component": "block_output"}``;
    ``dim`` and ``rank`` are the defaults of its ``"dim"`` and ``"rank"``.
    ``legacy`` uses pyvene ≤ 0.1.6 keys (dots) and 13-field representations (no ``latent_dim``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    reps, keys, counter = [], [], {}
    for entry in entries:
        layer, component = entry.get("layer", 1), entry.get("component", "block_output")
        unit, nunit = entry.get("unit", "pos"), 1
        if legacy:
            proposal = (f"comp.{component}.unit.{unit}.nunit.{nunit}" if "." in component
                        else f"layer.{layer}.comp.{component}.unit.{unit}.nunit.{nunit}")
        else:
            u = unit.replace(".", "_")
            proposal = (f"comp_{component.replace('.', '_')}_unit_{u}_nunit_{nunit}" if "." in component
                        else f"layer_{layer}_comp_{component}_unit_{u}_nunit_{nunit}")
        counter[proposal] = counter.get(proposal, -1) + 1
        key = f"{proposal}#{counter[proposal]}"
        keys.append(key)
        rep = [layer, component, unit, nunit, entry.get("rank", rank), None, None, None, None, None, None, None, None]
        reps.append(rep if legacy else [*rep, None])
        torch.save(entry["state"], folder / f"intkey_{key}.bin")
    config = {
        "intervention_constant_sources": [True] * len(entries),
        "intervention_dimensions": [entry.get("dim", dim) for entry in entries],
        "intervention_types": [f"<class '{entry.get('module', 'pyreft.interventions')}.{entry['class']}'>"
                               for entry in entries],
        "mode": "parallel",
        "representations": reps,
        "transformers_version": "5.23.0",
    }
    if sorted_keys:
        config["sorted_keys"] = keys
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return keys


def end_worker() -> None:
    """End a torchrun worker whose report is written: synchronize, tear the process group down, and leave
    without the interpreter's teardown.

    On CPU (gloo), a finished worker sometimes aborts during that teardown ("terminate called without an
    active exception": a C++ thread of torch's still joinable when its owner is destroyed), and torchrun
    then reports the whole job as failed although every result was written.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
