"""Offline character-level tokenizers for tests (no downloads), sized for ``tiny_models.VOCAB``.

Every printable ASCII character is one token; special tokens ``<pad>=0 <s>=1 </s>=2 <unk>=3``
(and ``[CLS]=4 [SEP]=5`` in the BERT style). Styles:

* ``"llama"``: adds ``<s>`` in front of every text (like Llama / Mistral);
* ``"gpt2"``: adds nothing;
* ``"bert"``: ``[CLS] text [SEP]``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]"]
CHARS = [chr(i) for i in range(32, 127)]
VOCAB = {token: i for i, token in enumerate(SPECIALS + CHARS)}  # 101 ids < tiny_models.VOCAB (128)

SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def tiny_tokenizer(style: str = "llama", pad: bool = True, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A fast character-level tokenizer; ``pad=False`` leaves ``pad_token`` unset (like Llama's)."""
    backend = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", VOCAB["<s>"])]
        )
    elif style == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
        )
    elif style != "gpt2":
        raise ValueError(f"unknown style {style!r}")
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if style == "bert":
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]")
    if pad:
        kwargs["pad_token"] = "<pad>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if chat_template:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def char_ids(text: str) -> list[int]:
    """The ids of ``text`` without special tokens (one per character)."""
    return [VOCAB.get(c, VOCAB["<unk>"]) for c in text]
