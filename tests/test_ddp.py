"""DDP: two CPU processes (gloo) train the same interventions as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

HERE = Path(__file__).parent
SCRIPT = HERE / "ddp_train.py"

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.xdist_group("torchrun"),  # one multi-process job at a time (see helpers.run_torchrun)
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    sys.path.insert(0, str(HERE))
    import ddp_train

    threads = torch.get_num_threads()
    try:
        expected = ddp_train.run(str(tmp_path / "single"), per_device_batch=ddp_train.GLOBAL_BATCH)
    finally:
        torch.set_num_threads(threads)

    out, logs = tmp_path / "ddp", tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), str(out), str(ddp_train.GLOBAL_BATCH // 2), str(logs),
    ]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun timed out:\n{exc.stdout}\n{exc.stderr}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    final = out / f"checkpoint-{ddp_train.STEPS}"
    trained = load_file(final / "reft_model.safetensors")
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], atol=1e-5, rtol=0, msg=key)
    torch.testing.assert_close(load_file(out / "final" / "reft_model.safetensors"), trained, atol=0, rtol=0)

    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in logs.glob("rank*.json"))}
    assert set(ranks) == {0, 1}
    assert all(r["world_size"] == 2 for r in ranks.values())
    assert ranks[1]["writes"] == [], f"rank 1 wrote {ranks[1]['writes']}"
    assert any(".reft_model.safetensors." in path for path in ranks[0]["writes"])  # atomic temp file, then rename
