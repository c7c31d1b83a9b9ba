"""The reftlib Trainer under DeepSpeed ZeRO-3 (``TrainingArguments(deepspeed=...)``); run by tests/test_zero3.py.

``python -m torch.distributed.run --nproc_per_node 1 tests/zero3_trainer.py OUT`` trains LoReFT on
the tiny Llama of ``fsdp_train`` with ``ReftTrainerForCausalLM`` and a ZeRO-3 config, saves the
interventions with ``trainer.save_model(OUT / "final")`` and writes ``OUT / "rank0.json"`` (losses,
whether the prefix cache is on). One process: on the CPU, accelerate sees one process whatever
torchrun starts (the Trainer's data sharding and saving would then be wrong), so several
processes run on GPUs only; one process still runs DeepSpeed's engine, ZeRO-3 partitioning and
DeepSpeed's own optimizer copies, which the Trainer's post-step updates must reach.
:func:`run_plain` is the same training without DeepSpeed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_train import GLOBAL_BATCH, STEPS, base_model, batch

# The example config users start from, with every parameter partitioned (the tiny model's are all
# below DeepSpeed's default persistence threshold, which would keep them whole on each process).
EXAMPLE = Path(__file__).parents[1] / "examples" / "distributed" / "ds_zero3.json"
CONFIG = json.loads(EXAMPLE.read_text())
CONFIG["zero_optimization"]["stage3_param_persistence_threshold"] = 0


class Rows:
    """The global batch as a dataset (each token is its own label)."""

    def __init__(self):
        self.ids = batch()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        import torch

        row = self.ids[index]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


def trainer(output_dir: Path, *, deepspeed: bool):
    import torch
    from transformers import TrainingArguments

    import reftlib
    from reftlib.training import ReftTrainerForCausalLM

    model = base_model()
    torch.manual_seed(7)  # the Trainer's batches carry no positions: they are configured
    reft_model = reftlib.get_reft_model(model, [
        {"layer": layer, "intervention": reftlib.LoreftIntervention(low_rank_dimension=4), "positions": "f2+l2"}
        for layer in (0, 2)
    ])
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=GLOBAL_BATCH, max_steps=STEPS, learning_rate=0.1,
        lr_scheduler_type="constant", optim="sgd", logging_steps=1, report_to=[], save_strategy="no", seed=0,
        deepspeed=CONFIG if deepspeed else None, use_cpu=not deepspeed,
    )
    torch.manual_seed(0)
    return ReftTrainerForCausalLM(model=reft_model, args=args, train_dataset=Rows())


def losses_of(run) -> list[float]:
    return [entry["loss"] for entry in run.state.log_history if "loss" in entry]


def run_plain(output_dir: Path) -> tuple[list[float], dict]:
    """The same training without DeepSpeed: losses and the adapter's tensors."""
    import torch

    from reftlib.io import get_adapter_state_dict

    torch.set_num_threads(1)
    run = trainer(output_dir, deepspeed=False)
    run.train()
    return losses_of(run), get_adapter_state_dict(run.reft_model)


def main() -> None:
    import torch

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    run = trainer(out, deepspeed=True)
    run.train()
    run.save_model(str(out / "final"))
    report = {"rank": 0, "world_size": 1, "losses": losses_of(run), "prefix_cache": run.prefix_cache is not None}
    (out / "rank0.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
