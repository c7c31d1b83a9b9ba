"""Data modules and the collator: tokenization, positions, truncation, padding."""

from __future__ import annotations

import datasets
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model
from tiny_tokenizer import VOCAB, char_ids, tiny_tokenizer
from transformers import DataCollatorForSeq2Seq

import reftlib
from reftlib.errors import InputError, PositionError
from reftlib.training import (
    ReftDataCollator,
    apply_chat_template,
    make_classification_data_module,
    make_last_position_supervised_data_module,
    make_multiple_position_supervised_data_module,
    make_supervised_examples,
    split_position_spec,
)

BOS, EOS, PAD = VOCAB["<s>"], VOCAB["</s>"], VOCAB["<pad>"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _tokens_at(ids, positions):
    return [ids[p] for p in positions if p >= 0]


# --------------------------------------------------------------------------- building examples
def test_last_position_example_layout(tok, llama):
    dm = make_last_position_supervised_data_module(tok, llama, ["hello", "ab"], [" world", "c"])
    assert set(dm) == {"train_dataset", "eval_dataset", "data_collator"}
    assert dm["eval_dataset"] is None and isinstance(dm["train_dataset"], datasets.Dataset)
    row = dm["train_dataset"][0]
    prompt = [BOS, *char_ids("hello")]
    assert row["input_ids"] == prompt + char_ids(" world") + [EOS]
    assert row["labels"] == [-100] * len(prompt) + char_ids(" world") + [EOS]
    assert row["intervention_locations"] == [[len(prompt) - 1]]  # "l1" = the last prompt token
    assert row["input_ids"][row["intervention_locations"][0][0]] == char_ids("o")[0]


def test_nonstop_has_no_eos(tok, llama):
    row = make_last_position_supervised_data_module(tok, llama, ["hi"], ["yo"], nonstop=True)["train_dataset"][0]
    assert row["input_ids"] == [BOS, *char_ids("hiyo")]


def test_gpt2_style_tokenizer_has_no_bos(llama):
    gpt2 = tiny_tokenizer("gpt2")
    row = make_last_position_supervised_data_module(gpt2, llama, ["hi"], ["yo"])["train_dataset"][0]
    assert row["input_ids"] == [*char_ids("hiyo"), EOS]
    assert row["intervention_locations"] == [[1]]


def test_bert_style_tokenizer_puts_no_separator_between_prompt_and_output(llama):
    bert = tiny_tokenizer("bert")
    row = make_last_position_supervised_data_module(bert, llama, ["hi"], ["yo"])["train_dataset"][0]
    assert row["input_ids"] == [VOCAB["[CLS]"], *char_ids("hiyo"), EOS]


def test_chat_template_gets_a_single_bos(llama):
    tok = tiny_tokenizer("llama", chat_template=True)
    prompts = apply_chat_template(tok, ["hi", "yo"])
    assert prompts[0] == "<s>[user]hi[assistant]"
    row = make_last_position_supervised_data_module(tok, llama, prompts, ["!", "?"])["train_dataset"][0]
    assert row["input_ids"][:2] == [BOS, char_ids("[")[0]]
    assert row["input_ids"].count(BOS) == 1
    assert row["input_ids"][row["intervention_locations"][0][0]] == char_ids("]")[0]
    with_system = apply_chat_template(tok, ["hi"], system_prompt="be nice")
    assert with_system == ["<s>[system]be nice[user]hi[assistant]"]


def test_chat_template_missing_is_an_error():
    with pytest.raises(InputError, match="chat_template"):
        apply_chat_template(tiny_tokenizer("llama"), ["hi"])


# --------------------------------------------------------------------------- positions
def test_f_plus_l_shared_lands_on_intended_tokens(tok, llama):
    dm = make_multiple_position_supervised_data_module(
        tok, llama, ["abcdefgh"], ["!"], positions="f2+l3", num_interventions=2, share_weights=True
    )
    row = dm["train_dataset"][0]
    prompt = [BOS, *char_ids("abcdefgh")]
    for locations in row["intervention_locations"]:  # every intervention gets f + l
        assert _tokens_at(row["input_ids"], locations) == prompt[:2] + prompt[-3:]


def test_f_plus_l_split_first_half_f_second_half_l(tok, llama):
    dm = make_multiple_position_supervised_data_module(
        tok, llama, ["abcdefgh"], ["!"], positions="f2+l3", num_interventions=4, share_weights=False
    )
    locs = dm["train_dataset"][0]["intervention_locations"]
    assert locs == [[0, 1, -1], [0, 1, -1], [6, 7, 8], [6, 7, 8]]


@pytest.mark.parametrize(("spec", "share_weights", "expected"), [
    ("f2+l3", False, ("f2", "l3")),
    (" L3+F2 ", False, ("f2", "l3")),  # parsed like every spec: case, spaces and order do not matter
    ("f2+l3", True, None),  # shared: every intervention gets the whole spec
    ("l1", False, None),
    ("f3", False, None),
    ("all", False, None),
])
def test_split_position_spec(spec, share_weights, expected):
    assert split_position_spec(spec, share_weights) == expected


def test_split_position_spec_rejects_bad_specs():
    with pytest.raises(PositionError, match="cannot parse position spec"):
        split_position_spec("last")


def test_split_halves_are_what_the_data_module_gives_each_half(tok, llama):
    """The halves named by split_position_spec, resolved on the prompt alone, are the rows of a split spec."""
    prompt_len = 1 + len("abcdefgh")  # BOS + 8 characters: longer than f2 + l3, so nothing overlaps
    cols = make_supervised_examples(tok, ["abcdefgh"], ["!"], "f2+l3", num_interventions=2, share_weights=False,
                                    max_length=64)
    first, last = split_position_spec("f2+l3")
    mask = torch.ones(1, prompt_len, dtype=torch.long)
    width = len(cols["intervention_locations"][0][0])
    expected = [reftlib.resolve_position_spec(half, mask)[0].tolist() for half in (first, last)]
    assert cols["intervention_locations"][0] == [row + [-1] * (width - len(row)) for row in expected]


def test_split_halves_on_a_short_prompt_match_generation(tok, llama):
    """On a prompt shorter than f + l, each half is what its saved spec resolves to at generation."""
    cols = make_supervised_examples(tok, ["ab"], ["!"], "f2+l2", num_interventions=2, share_weights=False,
                                    max_length=64)  # BOS + 2 tokens: f2 and l2 overlap on one token
    mask = torch.ones(1, 3, dtype=torch.long)
    expected = [reftlib.resolve_position_spec(half, mask)[0].tolist() for half in ("f2", "l2")]
    assert expected == [[0, 1], [1, 2]]
    assert cols["intervention_locations"][0] == expected


def test_split_needs_even_number_of_interventions(tok, llama):
    with pytest.raises(PositionError, match="even"):
        make_multiple_position_supervised_data_module(tok, llama, ["abc"], ["!"], positions="f1+l1", num_interventions=3)


def test_short_prompt_is_masked_never_duplicated(tok, llama):
    dm = make_multiple_position_supervised_data_module(
        tok, llama, ["abcdefghij", "a", "abc"], ["x", "y", "z"], positions="f3+l3", share_weights=True
    )
    rows = dm["train_dataset"]["intervention_locations"]
    assert rows[1] == [[0, 1, -1, -1, -1, -1]]  # 2 prompt tokens: both in f, nothing repeated in l
    assert sorted(p for p in rows[2][0] if p >= 0) == [0, 1, 2, 3]  # 4 tokens, each once
    for row, prompt_len in zip(rows, [11, 2, 4]):
        real = [p for p in row[0] if p >= 0]
        assert len(real) == len(set(real)) == min(6, prompt_len)
        assert all(p < prompt_len for p in real)


def test_all_positions_covers_the_prompt(tok, llama):
    rows = make_multiple_position_supervised_data_module(
        tok, llama, ["abc", "a"], ["x", "y"], positions="all"
    )["train_dataset"]["intervention_locations"]
    assert rows == [[[0, 1, 2, 3]], [[0, 1, -1, -1]]]


def test_explicit_positions_per_example(tok, llama):
    rows = make_multiple_position_supervised_data_module(
        tok, llama, ["abc", "abcd"], ["x", "y"], positions=[[1, 3], [[2], [4]]], num_interventions=2
    )["train_dataset"]["intervention_locations"]
    assert rows == [[[1, 3], [1, 3]], [[2], [4]]]
    with pytest.raises(PositionError, match="outside the prompt"):
        make_multiple_position_supervised_data_module(tok, llama, ["abc"], ["x"], positions=[[4]])
    with pytest.raises(PositionError, match="twice"):
        make_multiple_position_supervised_data_module(tok, llama, ["abc"], ["x"], positions=[[1, 1]])
    with pytest.raises(PositionError, match="entries"):
        make_multiple_position_supervised_data_module(tok, llama, ["abc"], ["x"], positions=[[1], [2]])


def test_num_interventions_checked_against_reft_model(tok, llama):
    reft_model = reftlib.get_reft_model(
        tiny_model("llama"), [{"layer": 0, "intervention": reftlib.LoreftIntervention(low_rank_dimension=2)}]
    )
    with pytest.raises(InputError, match="1 active intervention"):
        make_last_position_supervised_data_module(tok, reft_model, ["abc"], ["x"], num_interventions=2)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    n_first=st.integers(0, 5),
    n_last=st.integers(0, 5),
)
def test_spec_positions_property(lengths, n_first, n_last):
    if not (n_first or n_last):
        n_first = 1
    spec = "+".join(p for p in (f"f{n_first}" if n_first else "", f"l{n_last}" if n_last else "") if p)
    tok = tiny_tokenizer("gpt2")
    prompts = ["abcdefghijkl"[:n] for n in lengths]
    cols = make_supervised_examples(tok, prompts, ["x"] * len(prompts), spec, share_weights=True, max_length=64)
    for n, row in zip(lengths, cols["intervention_locations"]):
        first, last = row[0][:n_first], row[0][n_first:]
        real = [p for p in row[0] if p >= 0]
        assert len(real) == len(set(real)) == min(n, n_first + n_last)
        assert [p for p in first if p >= 0] == list(range(min(n, n_first)))
        assert all(p >= n_first and p >= n - n_last for p in last if p >= 0)
        assert all(0 <= p < n for p in real)


# --------------------------------------------------------------------------- errors and truncation
def test_empty_prompt_is_an_input_error(tok, llama):
    with pytest.raises(InputError, match="prompt 1 is empty"):
        make_last_position_supervised_data_module(tok, llama, ["ok", ""], ["x", "y"])


def test_mismatched_lengths_and_bad_types(tok, llama):
    with pytest.raises(InputError, match="2 examples"):
        make_last_position_supervised_data_module(tok, llama, ["a", "b"], ["x"])
    with pytest.raises(InputError, match="single string"):
        make_last_position_supervised_data_module(tok, llama, "abc", ["x"])
    with pytest.raises(InputError, match="not a string"):
        make_last_position_supervised_data_module(tok, llama, ["a", 3], ["x", "y"])


def test_output_is_truncated_first(tok, llama):
    row = make_last_position_supervised_data_module(tok, llama, ["abcd"], ["xyzw"], max_length=7)["train_dataset"][0]
    assert row["input_ids"] == [BOS, *char_ids("abcd"), *char_ids("xy")]
    assert row["intervention_locations"] == [[4]]


def test_default_max_length_is_capped_by_the_model(tok, llama):
    prompt = "a" * 200  # the tiny model has 128 positions; the tokenizer has no limit
    with pytest.raises(InputError, match=r"prompt 1 has 201 tokens but max_length is 128"):
        make_last_position_supervised_data_module(tok, llama, ["ok", prompt], ["x", "y"])


def test_long_prompt_truncate_left_keeps_bos_and_the_end(tok, llama):
    prompt = "abcdefghij" * 3
    dm = make_multiple_position_supervised_data_module(
        tok, llama, [prompt], ["xyz"], positions="f2+l2", share_weights=True, max_length=12, long_prompt="truncate_left"
    )
    row = dm["train_dataset"][0]
    assert len(row["input_ids"]) == 12
    assert row["input_ids"][:11] == [BOS, *char_ids(prompt[-10:])]
    assert row["input_ids"][11] == char_ids("x")[0] and row["labels"][11] == char_ids("x")[0]
    assert _tokens_at(row["input_ids"], row["intervention_locations"][0]) == [BOS, *char_ids("a"), *char_ids("ij")]


def test_explicit_positions_follow_left_truncation(tok, llama):
    prompt = "abcdefghij"  # 11 tokens with BOS; keep BOS + last 5
    rows = make_multiple_position_supervised_data_module(
        tok, llama, [prompt], ["x"], positions=[[0, 2, 9]], max_length=7, long_prompt="truncate_left"
    )["train_dataset"]
    ids, locs = rows[0]["input_ids"], rows[0]["intervention_locations"][0]
    assert locs == [0, -1, 4]  # "b" was cut; "i" moved from 9 to 4
    assert _tokens_at(ids, locs) == [BOS, *char_ids("i")]


# --------------------------------------------------------------------------- input containers
def test_accepts_pandas_datasets_and_tuples(tok, llama):
    frame = pd.DataFrame({"q": ["abc", "de"], "a": ["x", "y"]}, index=[10, 20])  # non-positional index
    expected = make_last_position_supervised_data_module(tok, llama, ["abc", "de"], ["x", "y"])["train_dataset"][:]
    from_pandas = make_last_position_supervised_data_module(tok, llama, frame["q"], frame["a"])["train_dataset"][:]
    table = datasets.Dataset.from_pandas(frame.reset_index(drop=True))
    from_hf = make_last_position_supervised_data_module(tok, llama, table["q"], table["a"])["train_dataset"][:]
    from_tuple = make_last_position_supervised_data_module(tok, llama, ("abc", "de"), ("x", "y"))["train_dataset"][:]
    assert from_pandas == expected == from_hf == from_tuple


# --------------------------------------------------------------------------- collator
def test_collator_right_padding_mixed_lengths(tok, llama):
    dm = make_multiple_position_supervised_data_module(
        tok, llama, ["abcdef", "a", "abc"], ["xyz", "y", ""], positions="f1+l2", share_weights=True
    )
    rows = [dm["train_dataset"][i] for i in range(3)]
    batch = dm["data_collator"](rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, row in enumerate(rows):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == PAD).all() and (batch["labels"][i, n:] == -100).all()
        assert batch["intervention_locations"][i].tolist() == row["intervention_locations"]
    assert batch["intervention_locations"].dtype == torch.long


def test_collator_left_padding_shifts_positions(tok, llama):
    dm = make_multiple_position_supervised_data_module(
        tok, llama, ["abcdef", "ab"], ["x", "y"], positions="f1+l2", share_weights=True, padding_side="left"
    )
    rows = [dm["train_dataset"][i] for i in range(2)]
    batch = dm["data_collator"](rows)
    for i, row in enumerate(rows):
        ids = batch["input_ids"][i].tolist()
        assert _tokens_at(ids, batch["intervention_locations"][i, 0].tolist()) == _tokens_at(
            row["input_ids"], row["intervention_locations"][0]
        )
        assert batch["attention_mask"][i].tolist() == [0] * (len(ids) - len(row["input_ids"])) + [1] * len(row["input_ids"])
    assert (batch["intervention_locations"][1, 0] == -1).sum() == (torch.tensor(rows[1]["intervention_locations"][0]) == -1).sum()


def test_left_and_right_padding_give_the_same_model_outputs(tok):
    reft_model = reftlib.get_reft_model(
        tiny_model("llama"), [{"layer": 1, "intervention": reftlib.LoreftIntervention(low_rank_dimension=4)}]
    )
    from helpers import randomize

    randomize(reft_model)
    prompts, outputs = ["abcdef", "ab", "abcd"], ["xyz", "y", "zz"]
    right = make_multiple_position_supervised_data_module(tok, reft_model, prompts, outputs, positions="f2+l2",
                                                          share_weights=True)
    left = make_multiple_position_supervised_data_module(tok, reft_model, prompts, outputs, positions="f2+l2",
                                                         share_weights=True, padding_side="left")
    rows = [right["train_dataset"][i] for i in range(3)]
    rb, lb = right["data_collator"](rows), left["data_collator"](rows)
    with torch.no_grad():
        r_logits = reft_model(**{k: v for k, v in rb.items() if k != "labels"}).logits
        l_logits = reft_model(**{k: v for k, v in lb.items() if k != "labels"}).logits
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        torch.testing.assert_close(r_logits[i, :n], l_logits[i, -n:], atol=1e-5, rtol=1e-4)


def test_attention_mask_when_a_real_token_equals_the_pad_id(llama):
    tok = tiny_tokenizer("llama", pad=False)
    with pytest.raises(InputError, match=r"tokenizer.pad_token = tokenizer.eos_token"):
        make_last_position_supervised_data_module(tok, llama, ["a"], ["b"])
    tok.pad_token = tok.eos_token  # pad id == eos id, and every example ends with a real eos
    dm = make_last_position_supervised_data_module(tok, llama, ["abc", "a"], ["xy", "y"])
    batch = dm["data_collator"]([dm["train_dataset"][0], dm["train_dataset"][1]])
    assert batch["input_ids"][1, 3].item() == EOS == tok.pad_token_id  # the real eos of row 1
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert batch["labels"][1].tolist() == [-100, -100, char_ids("y")[0], EOS, -100, -100, -100]


def test_pyreft_style_collator_and_pad_to_multiple(tok, llama):
    inner = DataCollatorForSeq2Seq(tokenizer=tok, model=llama, label_pad_token_id=-100, padding="longest",
                                   pad_to_multiple_of=8)
    collator = ReftDataCollator(data_collator=inner)
    ds = make_last_position_supervised_data_module(tok, llama, ["abc", "a"], ["x", "y"])["train_dataset"]
    batch = collator([ds[0], ds[1]])
    assert batch["input_ids"].shape[1] == 8
    assert batch["attention_mask"].sum(1).tolist() == [6, 4]


def test_collator_accepts_tensor_rows_and_rejects_inconsistent_interventions(tok, llama):
    collator = ReftDataCollator(tokenizer=tok)
    rows = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]),
         "intervention_locations": torch.tensor([[1]])},
        {"input_ids": [1, 5], "labels": [-100, 5], "intervention_locations": [[0, 1]]},
    ]
    batch = collator(rows)
    assert batch["intervention_locations"].tolist() == [[[1, -1]], [[0, 1]]]
    rows[1]["intervention_locations"] = [[0], [1]]
    with pytest.raises(PositionError, match="different numbers of interventions"):
        collator(rows)
    with pytest.raises(InputError, match="empty batch"):
        collator([])


# --------------------------------------------------------------------------- classification data
def test_classification_data_module_defaults(llama):
    bert_tok, bert = tiny_tokenizer("bert"), tiny_model("bert")
    dm = make_classification_data_module(bert_tok, bert, ["good", "bad!"], [1, 0])
    row = dm["train_dataset"][0]
    assert row["input_ids"] == [VOCAB["[CLS]"], *char_ids("good"), VOCAB["[SEP]"]]
    assert row["intervention_locations"] == [[0]]  # encoders: the [CLS] token the head reads
    batch = dm["data_collator"]([dm["train_dataset"][0], dm["train_dataset"][1]])
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    llama_tok = tiny_tokenizer("llama")
    dm = make_classification_data_module(llama_tok, llama, ["good", "bad!"], [0.5, -1.0])
    assert dm["train_dataset"][1]["intervention_locations"] == [[4]]  # decoders: the last token
    batch = dm["data_collator"]([dm["train_dataset"][0], dm["train_dataset"][1]])
    assert batch["labels"].dtype == torch.float32
    multi = make_classification_data_module(llama_tok, llama, ["ab", "cd"], [[1, 0, 1], [0, 1, 0]])
    batch = multi["data_collator"]([multi["train_dataset"][0], multi["train_dataset"][1]])
    assert batch["labels"].shape == (2, 3)
