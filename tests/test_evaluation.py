"""Tests of :mod:`reftlib.evaluation`: log-probability scoring, TruthfulQA MC1/MC2, exact match and the
benchmark loaders. Models are a tiny random Llama or test doubles with designed outputs; the tokenizer is
a character-level one built offline, with one merge (``": "``) so that ``"A:" + " answer"`` merges across
the prompt/answer boundary."""

from __future__ import annotations

import math
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, processors

from reftlib.errors import ReftConfigError, ReftError
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


class FixedDistributionModel:
    """Predicts the same next-token distribution at every position, whatever the input: the log-prob
    of an answer is then the sum of the designed log-probs of its tokens."""

    def __init__(self, probs: dict[int, float]) -> None:
        self.logits = torch.full((VOCAB_SIZE,), -1e4)
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


def manual_logprob(model: Any, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Log-prob of ``answer_ids`` after ``prompt_ids``, from one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
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


def test_logprobs_batched_equal_unbatched(llama: Any, tokenizer: Any) -> None:
    single = answer_logprobs(llama, tokenizer, PROMPTS, ANSWERS, batch_size=1, progress=False)
    for bs in (2, 3, 16):
        batched = answer_logprobs(llama, tokenizer, PROMPTS, ANSWERS, batch_size=bs, progress=False)
        assert batched == pytest.approx(single, abs=1e-4)
    assert all(lp < 0 for lp in single)


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_logprob_matches_manual_computation(llama: Any, tokenizer: Any, k: int) -> None:
    prompt, answer = PROMPTS[k], ANSWERS[k]
    p_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + answer)["input_ids"]
    if joint[: len(p_ids)] == p_ids:  # no merge: the answer tokens are the joint continuation
        a_ids = joint[len(p_ids) :]
    else:  # merge across the boundary: prompt and answer encoded separately
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    expected = manual_logprob(llama, p_ids, a_ids)
    got = answer_logprobs(llama, tokenizer, [prompt], [answer], progress=False)[0]
    assert got == pytest.approx(expected, abs=1e-5)


def test_logprobs_mask_not_built_from_pad_id(llama: Any) -> None:
    """With pad == EOS and an EOS inside the answer, the EOS must stay visible to the later tokens (a
    mask built from ``input_ids != pad_id`` would hide it and change their log-probs)."""
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    prompt, answer = "Q: Yes?\nA:", " yes</s> and more"
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id in a_ids[:-1]  # later answer tokens attend to it
    expected = manual_logprob(llama, tok(prompt)["input_ids"], a_ids)
    prompts, answers = [prompt, "Q: A much longer question, to force padding?\nA:"], [answer, " no"]
    got = answer_logprobs(llama, tok, prompts, answers, batch_size=2, progress=False)
    assert got[0] == pytest.approx(expected, abs=1e-4)


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
    model = designed_model(tokenizer)
    lps = answer_logprobs(model, tokenizer, ["Q: q\nA:"] * 2, [" A", " D"], progress=False)
    assert lps == pytest.approx([math.log(0.1), math.log(0.025)], abs=1e-5)

    out = truthfulqa_mc(model, tokenizer, MC_ROWS, batch_size=3, details=True, progress=False)
    assert out["n"] == 2
    assert out["mc1"] == 0.5
    assert out["mc2"] == pytest.approx((0.7 + 0.1 / 0.35) / 2, abs=1e-6)
    first, second = out["details"]
    assert (first["mc1"], second["mc1"]) == (1.0, 0.0)
    assert first["mc2"] == pytest.approx(0.7, abs=1e-6)
    assert second["mc2"] == pytest.approx(0.1 / 0.35, abs=1e-6)
    assert second["best_logprob"] == pytest.approx(math.log(0.05), abs=1e-5)
    assert len(second["correct_logprobs"]) == 1 and len(second["incorrect_logprobs"]) == 2
    assert "details" not in truthfulqa_mc(model, tokenizer, MC_ROWS, progress=False)


def test_truthfulqa_mc1_tie_counts_as_wrong(tokenizer: Any) -> None:
    out = truthfulqa_mc(
        designed_model(tokenizer), tokenizer, [TruthfulQAExample("q?", "A", ["A"], ["A"])], progress=False
    )
    assert out["mc1"] == 0.0
    assert out["mc2"] == pytest.approx(0.5, abs=1e-6)


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


def test_exact_match_tiny_llama_batched_equals_unbatched(llama: Any, tokenizer: Any) -> None:
    prompts = PROMPTS
    refs = ["x"] * len(prompts)
    single = exact_match_generate(
        llama, tokenizer, prompts, refs, max_new_tokens=6, batch_size=1, progress=False
    )
    batched = exact_match_generate(
        llama, tokenizer, prompts, refs, max_new_tokens=6, batch_size=5, progress=False
    )
    assert batched["predictions"] == single["predictions"]
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
