"""What a served answer is checked against: reftlib's Hugging Face model with the same adapters, in float64.

Shared by the vLLM suites (``test_vllm.py``, ``test_vllm_server.py``). The engine decodes greedily
in float32; the reference is fed the engine's tokens (teacher forcing through ``generate``, so
positions such as "l1" stay relative to the prompt) and gives each step's float64 log-probabilities.

Why not compare tokens alone: two float32 engines order their reductions differently (blocked
GEMMs, fused attention, batch shapes), so at a near tie between two tokens greedy decoding may pick
either, and such ties are common in the strongly steered text of the test adapters. Each step
checks (1) the served token is greedy under the reference up to ``TOLERANCE`` nats and (2) its
served log-probability is within ``TOLERANCE`` of the reference's. The tolerance is set by what the
tests must tell apart, not by one machine's rounding (float32 rounding over 30 layers is orders of
magnitude below it): every adapter row must move the log-probabilities of the served tokens by at
least ``SEPARATION * TOLERANCE`` nats from the base model's, so a row served without its adapter,
or with another row's, cannot pass. Failures name the row and the size of the difference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import randomize

import reftlib

MAX_NEW = 12
TOLERANCE = 1e-2  # nats
SEPARATION = 10  # each adapter moves the served tokens' log-probabilities by at least this many tolerances
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "How do I boil an egg?",
]
LONG_REQUEST = (
    "A lighthouse keeper on a small northern island writes a letter every evening to his sister, who "
    "lives in a busy city far to the south. He describes the weather, the ships that pass, the birds "
    "that nest on the cliffs and the repairs he makes to the lamp. She answers once a month with news "
    "of the markets, the trains, her children and the theatre. After ten years the lighthouse is "
    "automated and he must leave the island. Write the first paragraph of the letter he sends on his "
    "last evening there, and say in one sentence how his sister might reply."
)
ADAPTERS = ("default", "fl", "lofit", "l15")


def save_test_adapters(folder, pyreft_copy=None) -> None:
    """Save the three test adapters of the offline SmolLM2 into ``folder``.

    ``default``: LoReFT rank 4 at "l1" on layer 15; ``fl``: LoReFT rank 2 at "f2+l2" on layers 4
    and 20; ``lofit``: LoFiT head offsets on every position (heads 0, 2, 5 of layer 3, head 1 of 12);
    ``l15``: another LoReFT at "l1" on layer 15 (stacked with ``default``, the order matters).
    ``pyreft_copy``: also write ``default`` there as pyreft saves it (``W``, ``b`` and ``R`` as columns,
    no positions).
    """
    from reftlib.offline import load_default_model

    model, _ = load_default_model(dtype=torch.float32)
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig(representations=[
        {"layer": 15, "component": "block_output", "low_rank_dimension": 4, "positions": "l1"},
    ]), set_device=False)
    reft_model.add_adapter("fl", reftlib.ReftConfig(representations=[
        {"layer": 4, "component": "block_output", "low_rank_dimension": 2, "positions": "f2+l2"},
        {"layer": 20, "component": "block_output", "low_rank_dimension": 2, "positions": "f2+l2"},
    ]))
    reft_model.add_adapter("lofit", reftlib.ReftConfig(representations=[
        {"layer": 3, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[0, 2, 5]),
         "positions": None},
        {"layer": 12, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1]),
         "positions": None},
    ]))
    reft_model.add_adapter("l15", reftlib.ReftConfig(representations=[
        {"layer": 15, "component": "block_output", "low_rank_dimension": 4, "positions": "l1"},
    ]))
    randomize(reft_model, scale=0.5)
    with torch.no_grad():  # strong LoFiT offsets, so the steered text differs from the base text
        for name, param in reft_model.adapters["lofit"].named_parameters():
            param.mul_(8.0 if name.endswith("bias") else 1.0)
    reft_model.save_pretrained(folder)
    if pyreft_copy is not None:
        from collections import OrderedDict

        from helpers import write_pyreft_folder

        (loreft,) = reft_model.adapters["default"].values()
        state = OrderedDict(weight=loreft.learned_source.weight.detach().clone(),
                            bias=loreft.learned_source.bias.detach().clone(),
                            rotate_layer=loreft.rotate_layer.weight.detach().T.contiguous())
        write_pyreft_folder(Path(pyreft_copy), [{"class": "LoreftIntervention", "state": state, "layer": 15}],
                            dim=576, rank=4)


def load_reference(folder) -> reftlib.ReftModel:
    """The float64 offline SmolLM2 with every adapter saved in ``folder``."""
    from reftlib.offline import load_default_model

    reference = reftlib.ReftModel.from_pretrained(folder, load_default_model(dtype=torch.float64)[0])
    assert sorted(reference.adapters) == sorted(ADAPTERS)
    return reference.eval()


def chat_prompt(tokenizer, content: str) -> list[int]:
    """``content`` as one user turn in the chat template, with the generation prompt, as token ids."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)


class _ForceTokens:
    """A logits processor that makes ``generate`` emit ``tokens`` (teacher forcing with the KV cache)."""

    def __init__(self, prompt_length: int, tokens: list[int]):
        self.prompt_length, self.tokens = prompt_length, tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_length]] = 0.0
        return forced


def reference_logprobs(reference, prompt: list[int], adapter, tokens: list[int]) -> torch.Tensor:
    """``(len(tokens), vocab)`` float64 log-probabilities of each step of ``generate`` fed ``tokens``.

    ``adapter``: a name, a list of names (stacked in that order) or ``None`` (the base model).
    """
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter],
                             max_new_tokens=len(tokens), min_new_tokens=len(tokens), do_sample=False,
                             logits_processor=LogitsProcessorList([_ForceTokens(len(prompt), tokens)]),
                             output_logits=True, return_dict_in_generate=True)
    return torch.log_softmax(torch.stack([step[0] for step in out.logits]).double(), dim=-1)


def check_served(reference, prompt: list[int], adapter, tokens: list[int],
                 served_logprobs: list[float], where: str) -> None:
    """Check one served answer (its tokens and their log-probabilities) against the reference."""
    assert tokens, f"{where}: no tokens were served"
    served = torch.tensor(served_logprobs, dtype=torch.float64)
    steps, chosen = torch.arange(len(tokens)), torch.tensor(tokens)
    want = reference_logprobs(reference, prompt, adapter, tokens)
    greedy_gap = (want.max(dim=-1).values - want[steps, chosen]).max().item()
    error = (served - want[steps, chosen]).abs().max().item()
    where = f"{where} (adapter {adapter!r}, tokens {tokens})"
    assert greedy_gap <= TOLERANCE, f"{where}: a token {greedy_gap:.3g} nats below the greedy choice"
    assert error <= TOLERANCE, f"{where}: log-probabilities {error:.3g} nats from the reference"
    if adapter is not None:
        base = reference_logprobs(reference, prompt, None, tokens)
        moved = (base[steps, chosen] - want[steps, chosen]).abs().max().item()
        assert moved >= SEPARATION * TOLERANCE, f"{where}: the adapter moves only {moved:.3g} nats"


def assert_same_up_to_ties(reference, prompt: list[int], adapter, a: list[int], b: list[int],
                           where: str) -> None:
    """Two greedy answers to one request are equal, or part only at a near tie of the reference."""
    if a == b:
        return
    step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert step < min(len(a), len(b)), f"{where}: one answer stops early: {a} vs {b}"
    logprobs = reference_logprobs(reference, prompt, adapter, a[: step + 1])[step]
    gap = (logprobs[a[step]] - logprobs[b[step]]).abs().item()
    assert gap <= TOLERANCE, f"{where}: the answers part at step {step} where the reference prefers one by {gap:.3g} nats"
