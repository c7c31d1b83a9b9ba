"""Serving on other decoder families vLLM builds like Llama: tiny random models, one engine each.

Each family's tiny model (random weights, SmolLM2's tokenizer) is saved to a folder and served by
its own compiled engine (started and stopped per family; reftlib's model class for the family) with a LoReFT adapter at "l1" and LoFiT head
offsets; every answer is checked against reftlib's Hugging Face model in float64 fed the served
tokens (``served_reference.check_served``).
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from helpers import randomize
from served_reference import MAX_NEW, check_served

vllm = pytest.importorskip("vllm")

import reftlib  # noqa: E402
from reftlib.serving import SERVED_MODEL_TYPES, ReftLLM  # noqa: E402

pytestmark = pytest.mark.slow

FAMILIES = [family for family in SERVED_MODEL_TYPES if family != "llama"]  # Llama: test_vllm.py, on SmolLM2
SIZES = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)


def _tiny_folder(family: str, folder) -> None:
    """A random ``family`` model with SmolLM2's tokenizer files, saved in ``folder``."""
    import transformers as tf

    from reftlib.offline import default_model_path

    config = tf.AutoConfig.for_model(family, **SIZES)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init's, so the random model is not nearly uniform
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)
    model.save_pretrained(folder)
    for item in default_model_path().iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(item, folder / item.name)


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    """``(engine, float64 reference, prompts)`` for one family."""
    from transformers import AutoModelForCausalLM

    family = request.param
    model_folder = tmp_path_factory.mktemp(f"{family}-model")
    _tiny_folder(family, model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig(representations=[
        {"layer": 1, "component": "block_output", "low_rank_dimension": 2, "positions": "l1"},
    ]), set_device=False)
    reft_model.add_adapter("lofit", reftlib.ReftConfig(representations=[
        {"layer": 0, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[0, 2]),
         "positions": None},
    ]))
    randomize(reft_model, scale=1.0)
    adapter_folder = tmp_path_factory.mktemp(f"{family}-adapters")
    reft_model.save_pretrained(adapter_folder)
    reference = reftlib.ReftModel.from_pretrained(
        adapter_folder, AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float64)).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 49000, (n,), generator=generator).tolist() for n in (9, 23, 40)]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = ReftLLM(model_folder, adapters={"default": adapter_folder, "lofit": adapter_folder}, dtype="float32",
                     max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, block_size=32, seed=0)
    yield engine, reference, prompts
    engine.shutdown()
    logging.raiseExceptions = False  # see test_vllm.py: vLLM logs from exit hooks after pytest closed its streams


def test_family_matches_hf(served):
    engine, reference, prompts = served
    mode = engine.llm.collective_rpc("reft_engine_mode")[0]
    assert mode["compiled"] and mode["model_class"].startswith("Reftlib"), mode
    rows = [(p, a) for p in prompts for a in (None, "default", "lofit")]
    params = vllm.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = engine.generate([p for p, _ in rows], params, adapters=[a for _, a in rows])
    for row, ((prompt, adapter), out) in enumerate(zip(rows, outs)):
        tokens = list(out.outputs[0].token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
        check_served(reference, prompt, adapter, tokens, logprobs, f"row {row}")
