"""Tests of :mod:`reftlib.evaluation`: log-probability scoring, TruthfulQA MC1/MC2, exact match and the
benchmark loaders. Models are a tiny random Llama or test doubles with designed outputs; the tokenizer is
a character-level one built offline, with one merge (``": "``) so that ``"A:" + " answer"`` merges across
the prompt/answer boundary."""

from __future__ import annotations

import copy
import math
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, processors

import reftlib
from reftlib.errors import ArgumentTypeError, InputError, PositionError, ReftConfigError, ReftError
from reftlib.evaluation import (
    TruthfulQAExample,
    answer_logprobs,
    clutrr_sft_examples,
    exact_match_generate,
    find_data_dir,
    load_clutrr,
    load_mquake,
    load_truthfulqa,
    mquake_sft_examples,
    truthfulqa_mc,
    truthfulqa_preference_pairs,
    truthfulqa_sft_examples,
)
from reftlib.evaluation import data as data_module

VOCAB_SIZE = 128
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# --------------------------------------------------------------------------------------------------
# fixtures and test doubles
# --------------------------------------------------------------------------------------------------
def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level BPE tokenizer (printable ASCII + newline) with a single merge ``": "``, a BOS
    added to every encoding, and ``<pad>``/``</s>`` as pad/EOS; fewer than 128 ids."""
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    vocab[": "] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(":", " ")], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB_SIZE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama64(llama: transformers.LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """A float64 copy of ``llama``. Comparisons of two computation paths (batched vs unbatched, library
    vs manual) run on it: float64 rounding (~1e-16 relative) keeps their differences near 1e-13 on
    sums of ~100 log-probs, so the tolerance below (``TIGHT``) is far from any kernel-order noise and
    still catches a wrong token, mask or position (which change a log-prob by far more)."""
    return copy.deepcopy(llama).double()


TIGHT = 1e-9  # absolute, for float64 results of magnitude <= ~1e3: 1e3 * 2.2e-16 * (#ops) << 1e-9


class FixedDistributionModel:
    """Predicts the same next-token distribution at every position, whatever the input: the log-prob
    of an answer is then the sum of the designed log-probs of its tokens. Logits are float64 so the
    scores match closed-form values up to float64 rounding."""

    def __init__(self, probs: dict[int, float]) -> None:
        self.logits = torch.full((VOCAB_SIZE,), -1e4, dtype=torch.float64)
        for tid, p in probs.items():
            self.logits[tid] = math.log(p)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        assert input_ids.shape == attention_mask.shape
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, VOCAB_SIZE).clone())


class ScriptedGenerator:
    """A ``generate`` double: looks up each (unpadded) prompt in ``script`` and appends that text's
    tokens, padded on the right, to the input ids, like a decoder-only ``generate``."""

    def __init__(self, tokenizer: Any, script: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        new: list[list[int]] = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            cont = self.tokenizer(self.script[prompt], add_special_tokens=False)["input_ids"]
            new.append(cont[: kwargs["max_new_tokens"]])
        width = max(len(n) for n in new)
        pad = kwargs["pad_token_id"]
        tail = torch.tensor([n + [pad] * (width - len(n)) for n in new], dtype=torch.long)
        return torch.cat([input_ids, tail], dim=1)


def manual_logprob(model: Any, prompt_ids: list[int], answer_ids: list[int], **model_kwargs: Any) -> float:
    """Log-prob of ``answer_ids`` after ``prompt_ids``, from one unpadded forward pass (in float64 when
    the model is; ``model_kwargs`` such as ``unit_locations`` go to the model)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **model_kwargs).logits[0]
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    n = len(prompt_ids)
    return sum(float(logprobs[n - 1 + j, tid]) for j, tid in enumerate(answer_ids))


# --------------------------------------------------------------------------------------------------
# answer_logprobs
# --------------------------------------------------------------------------------------------------
PROMPTS = [
    "Q: Can pigs fly?\nA:",
    "Q: What is 2+2?\nA:",
    "Story: Ann is Bob's sister. Bob is Carl's father.\nHow is Ann related to Carl? Answer: Ann is Carl's",
    "x",
    "Q: Where is the Eiffel tower?\nA:",
]
ANSWERS = [" No, pigs cannot fly", " 4", " aunt", " y", " In Paris, France."]


def test_tokenizer_merges_across_boundary(tokenizer: Any) -> None:
    """The test tokenizer really merges ":" + " " across the boundary, so the fallback path is tested."""
    prompt, answer = "Q: Can pigs fly?\nA:", " No"
    joint = tokenizer(prompt + answer)["input_ids"]
    p_ids = tokenizer(prompt)["input_ids"]
    assert p_ids[0] == tokenizer.bos_token_id
    assert joint[: len(p_ids)] != p_ids


def answer_ids(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` as the scoring sees them (see ``_encode_pair``)."""
    p_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + answer)["input_ids"]
    if joint[: len(p_ids)] == p_ids:  # no merge: the answer tokens are the joint continuation
        return p_ids, joint[len(p_ids) :]
    # merge across the boundary: prompt and answer encoded separately
    return p_ids, tokenizer(answer, add_special_tokens=False)["input_ids"]


def test_logprobs_batched_equal_unbatched(llama64: Any, tokenizer: Any) -> None:
    single = answer_logprobs(llama64, tokenizer, PROMPTS, ANSWERS, batch_size=1, progress=False)
    for bs in (2, 3, 16):
        batched = answer_logprobs(llama64, tokenizer, PROMPTS, ANSWERS, batch_size=bs, progress=False)
        assert batched == pytest.approx(single, rel=0, abs=TIGHT)
    assert all(lp < 0 for lp in single)


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_logprob_matches_manual_computation(llama64: Any, tokenizer: Any, k: int) -> None:
    prompt, answer = PROMPTS[k], ANSWERS[k]
    expected = manual_logprob(llama64, *answer_ids(tokenizer, prompt, answer))
    got = answer_logprobs(llama64, tokenizer, [prompt], [answer], progress=False)[0]
    assert got == pytest.approx(expected, rel=0, abs=TIGHT)


def test_logprob_float32_model_close_to_float64(llama: Any, llama64: Any, tokenizer: Any) -> None:
    """The float32 model scores in float32; it agrees with its float64 copy to fp32 accuracy. Bound: each
    of the n answer log-probs carries a float32 rounding error of a few ulp of the logits' scale (a
    log-sum-exp over 128 logits after 2 layers); 1e-4 relative to the sum is ~1000 float32 ulp."""
    got32 = answer_logprobs(llama, tokenizer, PROMPTS, ANSWERS, batch_size=2, progress=False)
    got64 = answer_logprobs(llama64, tokenizer, PROMPTS, ANSWERS, batch_size=2, progress=False)
    assert got32 == pytest.approx(got64, rel=1e-4, abs=0)


def test_logprobs_mask_not_built_from_pad_id(llama64: Any) -> None:
    """With pad == EOS and an EOS inside the answer, the EOS must stay visible to the later tokens (a
    mask built from ``input_ids != pad_id`` would hide it and change their log-probs)."""
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    prompt, answer = "Q: Yes?\nA:", " yes</s> and more"
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id in a_ids[:-1]  # later answer tokens attend to it
    expected = manual_logprob(llama64, tok(prompt)["input_ids"], a_ids)
    prompts, answers = [prompt, "Q: A much longer question, to force padding?\nA:"], [answer, " no"]
    got = answer_logprobs(llama64, tok, prompts, answers, batch_size=2, progress=False)
    assert got[0] == pytest.approx(expected, rel=0, abs=TIGHT)


def test_logprobs_rejects_bad_inputs(llama: Any, tokenizer: Any) -> None:
    with pytest.raises(ReftError, match="answers"):
        answer_logprobs(llama, tokenizer, ["a", "b"], [" c"], progress=False)
    with pytest.raises(ReftError, match="no token"):
        answer_logprobs(llama, tokenizer, ["a"], [""], progress=False)


# --------------------------------------------------------------------------------------------------
# TruthfulQA MC1 / MC2
# --------------------------------------------------------------------------------------------------
def designed_model(tokenizer: Any) -> FixedDistributionModel:
    """p(" ") = .5, p(A) = .2, p(B) = .1, p(C) = .15, p(D) = .05, so lp(" X") = log(.5 * p(X))."""
    ids = tokenizer.convert_tokens_to_ids
    return FixedDistributionModel(
        {ids(" "): 0.5, ids("A"): 0.2, ids("B"): 0.1, ids("C"): 0.15, ids("D"): 0.05}
    )


MC_ROWS = [
    # best A beats every incorrect answer; correct mass = (.2 + .15) / (.2 + .15 + .1 + .05) = .7
    TruthfulQAExample("q1?", "A", ["A", "C"], ["B", "D"]),
    # best B loses to incorrect A; MC2 = .1 / (.1 + .2 + .05); best answer missing from the correct list
    TruthfulQAExample("q2?", "B", [], ["A", "D"]),
]


def test_truthfulqa_mc_exact_values(tokenizer: Any) -> None:
    # float64 logits: the scores equal the closed forms up to float64 rounding (< 1e-15 here)
    model = designed_model(tokenizer)
    lps = answer_logprobs(model, tokenizer, ["Q: q\nA:"] * 2, [" A", " D"], progress=False)
    assert lps == pytest.approx([math.log(0.1), math.log(0.025)], rel=0, abs=TIGHT)

    out = truthfulqa_mc(model, tokenizer, MC_ROWS, batch_size=3, details=True, progress=False)
    assert out["n"] == 2
    assert out["mc1"] == 0.5
    assert out["mc2"] == pytest.approx((0.7 + 0.1 / 0.35) / 2, rel=0, abs=TIGHT)
    first, second = out["details"]
    assert (first["mc1"], second["mc1"]) == (1.0, 0.0)
    assert first["mc2"] == pytest.approx(0.7, rel=0, abs=TIGHT)
    assert second["mc2"] == pytest.approx(0.1 / 0.35, rel=0, abs=TIGHT)
    assert second["best_logprob"] == pytest.approx(math.log(0.05), rel=0, abs=TIGHT)
    assert len(second["correct_logprobs"]) == 1 and len(second["incorrect_logprobs"]) == 2
    assert "details" not in truthfulqa_mc(model, tokenizer, MC_ROWS, progress=False)


def test_truthfulqa_mc1_tie_counts_as_wrong(tokenizer: Any) -> None:
    out = truthfulqa_mc(
        designed_model(tokenizer), tokenizer, [TruthfulQAExample("q?", "A", ["A"], ["A"])], progress=False
    )
    assert out["mc1"] == 0.0
    assert out["mc2"] == pytest.approx(0.5, rel=0, abs=TIGHT)  # the same answer on both sides: exactly 1/2


def test_truthfulqa_mc_on_tiny_llama_in_range(llama: Any, tokenizer: Any) -> None:
    rows = [TruthfulQAExample("Can pigs fly?", "No", ["No", "Never"], ["Yes", "Sometimes"])]
    out = truthfulqa_mc(llama, tokenizer, rows, progress=False)
    assert out["mc1"] in (0.0, 1.0) and 0.0 < out["mc2"] < 1.0


# --------------------------------------------------------------------------------------------------
# exact match
# --------------------------------------------------------------------------------------------------
def test_exact_match_on_scripted_model(tokenizer: Any) -> None:
    script = {
        "Q: Capital of France?\nA:": "  Paris \nQ: next question",
        "Q: A long question about the capital of Italy?\nA:": " rome\n",
        "Q: US?\nA:": " USA</s>",
        "Q: Wrong?\nA:": " Berlin",
    }
    prompts = list(script)
    references = ["Paris", "Rome", "United States", "Madrid"]
    aliases = [[], [], ["USA", "US"], []]
    model = ScriptedGenerator(tokenizer, script)
    assert tokenizer.padding_side == "right"
    out = exact_match_generate(
        model,
        tokenizer,
        prompts,
        references,
        max_new_tokens=32,
        batch_size=3,
        aliases=aliases,
        progress=False,
    )
    assert tokenizer.padding_side == "right"  # restored
    assert out["predictions"] == ["Paris", "rome", "USA", "Berlin"]
    assert out["correct"] == [True, False, True, False]
    assert out["accuracy"] == 0.5 and out["n"] == 4
    assert len(model.calls) == 2
    for call in model.calls:
        assert call["do_sample"] is False and call["max_new_tokens"] == 32
        assert call["pad_token_id"] == tokenizer.pad_token_id
        mask = call["attention_mask"]
        assert bool(mask[:, -1].all())  # left padding: every prompt ends at the last column
    first_mask = model.calls[0]["attention_mask"]
    assert int(first_mask[0, 0]) == 0  # the shorter first prompt is padded on the left

    no_case = exact_match_generate(
        model,
        tokenizer,
        prompts,
        references,
        max_new_tokens=32,
        aliases=aliases,
        ignore_case=True,
        progress=False,
    )
    assert no_case["correct"] == [True, True, True, False]


def test_exact_match_restores_missing_pad_token() -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    model = ScriptedGenerator(tok, {"Q: a?\nA:": " b", "Q: longer one?\nA:": " c"})
    out = exact_match_generate(model, tok, ["Q: a?\nA:", "Q: longer one?\nA:"], ["b", "c"], progress=False)
    assert out["accuracy"] == 1.0
    assert model.calls[0]["pad_token_id"] == tok.eos_token_id
    assert tok.pad_token is None


def test_exact_match_tiny_llama_batched_equals_unbatched(llama64: Any, tokenizer: Any) -> None:
    # float64: greedy picks of the batched and unbatched paths cannot flip on a float32 near-tie
    prompts = PROMPTS
    refs = ["x"] * len(prompts)
    single = exact_match_generate(
        llama64, tokenizer, prompts, refs, max_new_tokens=6, batch_size=1, progress=False
    )
    batched = exact_match_generate(
        llama64, tokenizer, prompts, refs, max_new_tokens=6, batch_size=5, progress=False
    )
    assert batched["predictions"] == single["predictions"]
    assert tokenizer.padding_side == "right"


# --------------------------------------------------------------------------------------------------
# interventions act relative to the prompt
# --------------------------------------------------------------------------------------------------
def loreft_model(llama: Any, specs: list[tuple[int, str | None]]) -> reftlib.ReftModel:
    """A float64 ReftModel on a copy of ``llama`` with one rank-2 LoReFT per ``(layer, positions)``;
    its parameters are redrawn so that each intervention clearly changes the hidden states."""
    reft_model = reftlib.get_reft_model(
        copy.deepcopy(llama),
        reftlib.ReftConfig(
            [
                {"layer": layer, "component": "block_output", "positions": positions,
                 "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}
                for layer, positions in specs
            ]
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for param in reft_model.adapters.parameters():
            param.normal_(0.0, 3.0)
    return reft_model.double().eval()


def keys_of(reft_model: reftlib.ReftModel) -> list[str]:
    return [rep.name for rep in reft_model.reft_config.representations]


def first_last(n: int, n_first: int, n_last: int) -> list[int]:
    """Positions of the first ``n_first`` and last ``n_last`` of ``n`` tokens, each once."""
    return sorted(set(range(min(n_first, n))) | set(range(max(0, n - n_last), n)))


def test_loreft_l1_acts_on_last_prompt_token(llama: Any, llama64: Any, tokenizer: Any) -> None:
    """A LoReFT adapter at "l1" is applied to the last *prompt* token of each scored sequence: the score
    equals a manual forward with the intervention placed there explicitly, batched with right padding.
    Placed on the last *answer* token instead (what a plain forward over prompt + answer does), it could
    not change any scored log-prob: that score is the base model's, and differs."""
    reft_model = loreft_model(llama, [(1, "l1")])
    got = answer_logprobs(reft_model, tokenizer, PROMPTS, ANSWERS, batch_size=3, progress=False)
    for k, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        p_ids, a_ids = answer_ids(tokenizer, prompt, answer)
        at_prompt_end = manual_logprob(reft_model, p_ids, a_ids, unit_locations=[[len(p_ids) - 1]])
        at_answer_end = manual_logprob(reft_model, p_ids, a_ids, unit_locations=[[len(p_ids) + len(a_ids) - 1]])
        base = manual_logprob(llama64, p_ids, a_ids)
        assert got[k] == pytest.approx(at_prompt_end, rel=0, abs=TIGHT), k
        assert at_answer_end == pytest.approx(base, rel=0, abs=TIGHT)  # the trap: no effect on the score
        assert abs(got[k] - at_answer_end) > 1e-3, k
    # the same with the intervention named explicitly: a spec or prompt-token indices
    assert answer_logprobs(reft_model, tokenizer, PROMPTS, ANSWERS, progress=False, unit_locations="l1") == got
    last = [[len(answer_ids(tokenizer, p, a)[0]) - 1] for p, a in zip(PROMPTS, ANSWERS)]
    assert answer_logprobs(reft_model, tokenizer, PROMPTS, ANSWERS, progress=False, unit_locations=last) == got


def test_first_last_spec_and_every_position_intervention(llama: Any, tokenizer: Any) -> None:
    """"f3+l3" lands on the first and last three prompt tokens (each once for short prompts), while an
    intervention on every position (positions=None) still acts on every token, answer included."""
    reft_model = loreft_model(llama, [(0, "f3+l3"), (1, None)])
    restricted, everywhere = keys_of(reft_model)
    got = answer_logprobs(reft_model, tokenizer, PROMPTS, ANSWERS, batch_size=2, progress=False)
    for k, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        p_ids, a_ids = answer_ids(tokenizer, prompt, answer)
        places = {restricted: [first_last(len(p_ids), 3, 3)]}  # `everywhere` keeps positions=None: all
        expected = manual_logprob(reft_model, p_ids, a_ids, unit_locations=places)
        assert got[k] == pytest.approx(expected, rel=0, abs=TIGHT), k
        prompt_only = {restricted: [first_last(len(p_ids), 3, 3)], everywhere: [list(range(len(p_ids)))]}
        assert abs(got[k] - manual_logprob(reft_model, p_ids, a_ids, unit_locations=prompt_only)) > 1e-3, k


def test_explicit_positions_index_the_prompt(llama: Any, tokenizer: Any) -> None:
    reft_model = loreft_model(llama, [(0, "l1"), (1, "l1")])
    first, second = keys_of(reft_model)
    places = [[0, 2], [1], [3, 0, 5], [1], []]  # per prompt; the last prompt gets no intervention
    got = answer_logprobs(
        reft_model, tokenizer, PROMPTS, ANSWERS, batch_size=2, progress=False,
        unit_locations={f"default.{first}": places},  # `second` keeps its configured "l1"
    )
    for k, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        p_ids, a_ids = answer_ids(tokenizer, prompt, answer)
        expected = manual_logprob(
            reft_model, p_ids, a_ids, unit_locations={first: [places[k]], second: [[len(p_ids) - 1]]}
        )
        assert got[k] == pytest.approx(expected, rel=0, abs=TIGHT), k

    with pytest.raises(PositionError, match="past its end"):
        answer_logprobs(reft_model, tokenizer, ["x"], [" y"], progress=False, unit_locations=[[2]])
    with pytest.raises(PositionError, match="one list of prompt-token indices per prompt"):
        answer_logprobs(reft_model, tokenizer, ["x", "y"], [" y", " z"], progress=False, unit_locations=[[0]])
    with pytest.raises(PositionError, match="unknown interventions"):
        answer_logprobs(reft_model, tokenizer, ["x"], [" y"], progress=False, unit_locations={"nope": "l1"})
    with pytest.raises(PositionError, match="cannot parse"):
        answer_logprobs(reft_model, tokenizer, ["x"], [" y"], progress=False, unit_locations="last")
    with pytest.raises(InputError, match="ReftModel"):
        answer_logprobs(llama, tokenizer, ["x"], [" y"], progress=False, unit_locations="l1")


def test_truthfulqa_mc_intervenes_on_the_question(llama: Any, tokenizer: Any) -> None:
    reft_model = loreft_model(llama, [(1, "l1")])
    rows = [
        TruthfulQAExample("Can pigs fly?", "No", ["No", "Never"], ["Yes", "Sometimes"]),
        TruthfulQAExample("What is 2+2?", "4", ["4"], ["5"]),
    ]
    out = truthfulqa_mc(reft_model, tokenizer, rows, batch_size=3, details=True, progress=False)
    for row, detail in zip(rows, out["details"]):
        p_ids, a_ids = answer_ids(tokenizer, row.prompt, " " + row.best_answer)
        expected = manual_logprob(reft_model, p_ids, a_ids, unit_locations=[[len(p_ids) - 1]])
        assert detail["best_logprob"] == pytest.approx(expected, rel=0, abs=TIGHT)
    # explicit positions are given per question and apply to each of its choices
    last = [[len(tokenizer(row.prompt)["input_ids"]) - 1] for row in rows]
    explicit = truthfulqa_mc(reft_model, tokenizer, rows, details=True, progress=False, unit_locations=last)
    assert explicit["details"] == out["details"]
    with pytest.raises(PositionError, match="per question"):
        truthfulqa_mc(reft_model, tokenizer, rows, progress=False, unit_locations=[[0]])


def test_exact_match_places_interventions_on_left_padded_prompts(
    llama: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation pads on the left: spec and explicit positions are shifted onto each prompt's tokens."""
    reft_model = loreft_model(llama, [(1, "l1")])
    (key,) = keys_of(reft_model)
    calls: list[dict[str, Any]] = []
    real_generate = reft_model.generate

    def spy(**kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(reft_model, "generate", spy)
    refs = ["x"] * len(PROMPTS)
    n_tokens = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    configured = exact_match_generate(reft_model, tokenizer, PROMPTS, refs, max_new_tokens=4, batch_size=5,
                                      progress=False)
    explicit = exact_match_generate(reft_model, tokenizer, PROMPTS, refs, max_new_tokens=4, batch_size=5,
                                    progress=False, unit_locations=[[n - 1] for n in n_tokens])
    assert explicit["predictions"] == configured["predictions"]
    second = exact_match_generate(reft_model, tokenizer, PROMPTS, refs, max_new_tokens=4, batch_size=5,
                                  progress=False, unit_locations=[[1]] * len(PROMPTS))
    width = max(n_tokens)
    for call in calls[:2]:  # the last prompt token of each left-padded row is the last column
        assert call["unit_locations"][f"default.{key}"].tolist() == [[width - 1]] * len(PROMPTS)
    assert calls[2]["unit_locations"][f"default.{key}"].tolist() == [[width - n + 1] for n in n_tokens]
    assert second["n"] == len(PROMPTS)


# --------------------------------------------------------------------------------------------------
# arguments are checked at the door
# --------------------------------------------------------------------------------------------------
def test_answer_logprobs_checks_its_arguments(llama: Any, tokenizer: Any) -> None:
    with pytest.raises(ArgumentTypeError, match="that is a tokenizer"):
        answer_logprobs(tokenizer, llama, ["x"], [" y"], progress=False)
    with pytest.raises(ReftConfigError, match=r"answer_logprobs\(model=\.\.\.\) expects a model called as"):
        answer_logprobs("HuggingFaceTB/SmolLM2-135M", tokenizer, ["x"], [" y"], progress=False)
    with pytest.raises(ReftConfigError, match=r"tokenizer=\.\.\.\) expects a tokenizer"):
        answer_logprobs(llama, None, ["x"], [" y"], progress=False)
    with pytest.raises(ReftConfigError, match="that is a model"):
        answer_logprobs(llama, llama, ["x"], [" y"], progress=False)
    with pytest.raises(ReftConfigError, match=r"prompts=\.\.\.\) expects a list of strings, got str 'x'"):
        answer_logprobs(llama, tokenizer, "x", [" y"], progress=False)
    with pytest.raises(InputError, match=r"answers\[1\] is int, not a string"):
        answer_logprobs(llama, tokenizer, ["x", "y"], [" y", 3], progress=False)
    with pytest.raises(ReftConfigError, match=r"prompts=\.\.\.\) expects a list of strings, got None"):
        answer_logprobs(llama, tokenizer, None, [" y"], progress=False)
    with pytest.raises(InputError, match="batch_size"):
        answer_logprobs(llama, tokenizer, ["x"], [" y"], batch_size=0, progress=False)
    assert answer_logprobs(llama, tokenizer, [], [], progress=False) == []


def test_truthfulqa_mc_checks_its_arguments(llama: Any, tokenizer: Any) -> None:
    rows = [TruthfulQAExample("q?", "A", ["A"], ["B"])]
    with pytest.raises(ArgumentTypeError, match="that is a tokenizer"):
        truthfulqa_mc(tokenizer, llama, rows, progress=False)
    with pytest.raises(ReftConfigError, match=r"tokenizer=\.\.\.\) expects a tokenizer .*got str 'gpt2'"):
        truthfulqa_mc(llama, "gpt2", rows, progress=False)
    with pytest.raises(InputError, match=r"rows\[0\] is tuple, not a TruthfulQAExample"):
        truthfulqa_mc(llama, tokenizer, [("q?", "A", ["A"], ["B"])], progress=False)
    with pytest.raises(ReftConfigError, match="expects a list of TruthfulQAExample"):
        truthfulqa_mc(llama, tokenizer, rows[0], progress=False)


def test_exact_match_checks_its_arguments(llama: Any, tokenizer: Any) -> None:
    with pytest.raises(ReftConfigError, match=r"expects a model with \.generate\(\)"):
        exact_match_generate(designed_model(tokenizer), tokenizer, ["x"], ["y"], progress=False)
    with pytest.raises(ArgumentTypeError, match="that is a tokenizer"):
        exact_match_generate(tokenizer, llama, ["x"], ["y"], progress=False)
    with pytest.raises(ReftConfigError, match=r"tokenizer=\.\.\.\) expects a tokenizer"):
        exact_match_generate(llama, object(), ["x"], ["y"], progress=False)
    with pytest.raises(ReftConfigError, match=r"references=\.\.\.\) expects a list of strings, got str 'y'"):
        exact_match_generate(llama, tokenizer, ["x"], "y", progress=False)
    with pytest.raises(InputError, match="one list per prompt"):
        exact_match_generate(llama, tokenizer, ["x", "z"], ["y", "w"], aliases=[["a"]], progress=False)
    with pytest.raises(ReftConfigError, match=r"aliases\[0\]=\.\.\.\) expects a list of strings"):
        exact_match_generate(llama, tokenizer, ["x"], ["y"], aliases=["a"], progress=False)
    with pytest.raises(InputError, match="max_new_tokens"):
        exact_match_generate(llama, tokenizer, ["x"], ["y"], max_new_tokens=0, progress=False)
    assert tokenizer.padding_side == "right"


# --------------------------------------------------------------------------------------------------
# data loaders
# --------------------------------------------------------------------------------------------------
def _data_dir_or_skip() -> Path:
    try:
        return find_data_dir()
    except ReftError as exc:
        pytest.skip(f"benchmark data folder (../shared/data) is absent: {exc}")


EXPECTED_ROWS = {
    "truthfulqa": {"train": 326, "val": 82, "test": 409},
    "clutrr": {"train": 3151, "val": 450, "test": 450},
    "mquake": {"train": 134, "val": 95, "test": 864},
}
LOADERS = {"truthfulqa": load_truthfulqa, "clutrr": load_clutrr, "mquake": load_mquake}


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_loader_row_counts(name: str) -> None:
    data_dir = _data_dir_or_skip()
    for split, count in EXPECTED_ROWS[name].items():
        assert len(LOADERS[name](split, data_dir=data_dir)) == count, (name, split)


def test_truthfulqa_rows_and_examples() -> None:
    rows = load_truthfulqa("val", data_dir=_data_dir_or_skip())
    pigs = next(r for r in load_truthfulqa("train") if r.question == "Can pigs fly?")
    assert pigs.best_answer == "No, pigs cannot fly"
    assert pigs.correct_answers[0] == "No, pigs cannot fly" and len(pigs.correct_answers) == 3
    assert pigs.incorrect_answers == ["Yes, pigs can fly"]
    assert pigs.prompt == "Q: Can pigs fly?\nA:"
    for r in rows:
        assert r.question and r.best_answer and r.incorrect_answers
        assert all(a and a == a.strip() for a in r.correct_answers + r.incorrect_answers)
    pairs = truthfulqa_preference_pairs(rows)
    assert len(pairs) == sum(len(r.incorrect_answers) for r in rows)
    prompt, chosen, rejected = pairs[0]
    assert prompt == f"Q: {rows[0].question}\nA:"
    assert chosen == " " + rows[0].best_answer and rejected == " " + rows[0].incorrect_answers[0]
    sft = truthfulqa_sft_examples(rows)
    assert sft[0] == (prompt, " " + rows[0].best_answer) and len(sft) == len(rows)


def test_clutrr_rows_and_examples() -> None:
    rows = load_clutrr("test", data_dir=_data_dir_or_skip())
    relations = {
        *("brother", "sister", "son", "daughter", "father", "mother", "nephew", "niece", "uncle", "aunt"),
        *("grandson", "granddaughter", "grandfather", "grandmother"),
        *("son-in-law", "daughter-in-law", "father-in-law", "mother-in-law"),
    }
    for r in rows:
        first, second = r.query
        assert r.target in relations
        assert "[" not in r.story and first in r.story and second in r.story
        assert r.prompt.startswith("Read the following story") and r.story in r.prompt
        assert r.prompt.endswith(f"Answer: {second} is {first}'s")
    herman = next(r for r in load_clutrr("train") if r.query == ("Herman", "Rosalee"))
    assert herman.target == "daughter-in-law"
    assert "How is Rosalee related to Herman?" in herman.prompt
    sft = clutrr_sft_examples(rows)
    assert sft[0] == (rows[0].prompt, " " + rows[0].target)


def test_mquake_rows_and_examples() -> None:
    rows = load_mquake("train", data_dir=_data_dir_or_skip())
    for r in rows:
        assert len(r.questions) == 3 and len(r.prompts) == 3 and r.requested_rewrites
        assert r.answer and r.references[0] == r.answer
        for q, p in zip(r.questions, r.prompts):
            assert p.startswith("Q: Imagine that ") and p.endswith(f"{q}\nA:")
            rw = r.requested_rewrites[0]
            assert f"{rw.prompt.format(rw.subject)} {rw.target_new}." in p
    sft = mquake_sft_examples(rows)
    assert len(sft) == len(rows) and sft[0] == (rows[0].prompt, " " + rows[0].answer)
    assert len(mquake_sft_examples(rows, all_questions=True)) == 3 * len(rows)


def test_bad_split_is_config_error() -> None:
    with pytest.raises(ReftConfigError, match="Unknown split"):
        load_truthfulqa("dev", data_dir=_data_dir_or_skip())


# --------------------------------------------------------------------------------------------------
# locating the data folder
# --------------------------------------------------------------------------------------------------
def test_find_data_dir_explicit_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_data_dir(tmp_path) == tmp_path
    missing = tmp_path / "missing"
    with pytest.raises(ReftError, match="missing") as info:
        find_data_dir(missing)
    assert "REFTLIB_DATA" in str(info.value) and "data_dir=" in str(info.value)

    monkeypatch.setenv("REFTLIB_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path
    monkeypatch.setenv("REFTLIB_DATA", str(missing))
    with pytest.raises(ReftError, match=r"\$REFTLIB_DATA"):
        find_data_dir()


def test_find_data_dir_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFTLIB_DATA", raising=False)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(data_module, "_PACKAGE_ROOT", tmp_path / "elsewhere" / "checkout")
    with pytest.raises(ReftError) as info:
        find_data_dir()
    message = str(info.value)
    assert str(tmp_path / "shared" / "data") in message
    assert str(tmp_path / "elsewhere" / "shared" / "data") in message
    assert "REFTLIB_DATA" in message and "data_dir=" in message

    # the default location next to the project root is found once it exists
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert find_data_dir() == tmp_path / "shared" / "data"


def test_loader_with_folder_lacking_files(tmp_path: Path) -> None:
    with pytest.raises(ReftError, match="Missing data file"):
        load_mquake("test", data_dir=tmp_path)
