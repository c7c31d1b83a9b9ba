"""Train a tiny Llama's interventions with ReftTrainerForCausalLM; run by tests/test_ddp.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py OUT PER_DEVICE_BATCH LOG_DIR``
trains with DDP (gloo, CPU); :func:`run` called in-process trains the single-process reference.
Every process records the files it opened for writing under ``OUT`` in ``LOG_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers import end_worker

PROMPTS = ["apple", "banana split", "cherry", "date", "elder", "fig tree", "grape", "honeydew"]
OUTPUTS = ["r", "ye", "d", "b", "ee", "g", "p", "hh"]
GLOBAL_BATCH = 8  # = len(PROMPTS): every step sees every example, whatever the number of processes
STEPS = 3


def _audit_writes(output_dir: str, log: list[str]) -> None:
    root = os.path.realpath(output_dir)

    def hook(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = [*args, None, None][:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing and os.path.realpath(os.fsdecode(path)).startswith(root):
            log.append(os.fsdecode(path))

    sys.addaudithook(hook)


def run(output_dir: str, per_device_batch: int, info: dict | None = None) -> dict:
    """Train for :data:`STEPS` steps; returns the intervention tensors (on every process)."""
    import torch
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer
    from transformers import TrainingArguments

    import reftlib
    from reftlib.training import ReftTrainerForCausalLM, make_multiple_position_supervised_data_module

    torch.set_num_threads(1)
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator) * 0.5)
    torch.manual_seed(7)
    reps = [{"layer": layer, "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)} for layer in (0, 2)]
    reft_model = reftlib.get_reft_model(model, reps)
    tokenizer = tiny_tokenizer("llama")
    module = make_multiple_position_supervised_data_module(
        tokenizer, reft_model, PROMPTS, OUTPUTS, positions="f2+l2", num_interventions=2, share_weights=True
    )
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device_batch, max_steps=STEPS,
        optim="sgd", learning_rate=0.5, max_grad_norm=0.0,  # plain SGD, no clipping: sensitive to loss scaling
        lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps",
        save_steps=STEPS, logging_steps=1, seed=0, dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **module)
    trainer.train()
    trainer.save_model(os.path.join(output_dir, "final"))
    if info is not None:
        info.update(world_size=trainer.args.world_size, should_save=trainer.args.should_save)
    return {k: v.detach().clone() for k, v in reft_model.adapters["default"].state_dict().items()}


def main() -> None:
    output_dir, per_device_batch, log_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    writes: list[str] = []
    _audit_writes(output_dir, writes)
    info: dict = {"rank": rank}
    run(output_dir, per_device_batch, info)
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps({**info, "writes": sorted(set(writes))}))


if __name__ == "__main__":
    main()
    end_worker()
