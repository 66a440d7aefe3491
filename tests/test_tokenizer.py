"""The Llama 3 tokenizer against Meta's reference tiktoken tokenizer (llama_models.llama3.tokenizer.Tokenizer)."""

from __future__ import annotations

import pytest

from posttrain.chat import encode_text
from posttrain.tokenizer import BEGIN_OF_TEXT, EOM, EOT, PAD, PYTHON_TAG, START_HEADER, is_llama3

# Each string probes a part of the pre-tokenizer pattern or of Meta's chunking.
BATTERY = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "\n\nnewlines\n\n\nin the middle\r\nand CRLF\n",
    "tabs\tand\t\tmixed \t whitespace",
    "你好，世界！这是一个测试。",
    "مرحبا بالعالم، هذا اختبار.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tpass",
    "1234567890 3.14159265358979 -42 1,000,000 0x1F 2024-07-26",
    "I'm we'll they've she'd it's DON'T",
    "Ünïcödé ßtraße naïve café",
    "mixed 中文 and English 123 together!!!",
    "",
    " ",
    "\n",
    "x" * 300,
    "a" * 25_010,  # one run longer than Meta's 25k-char cut
    " " * 25_005 + "x",  # a whitespace run longer than the cut: tokens differ if the cut is not replayed
    "\n" * 30_000,
]
SPECIAL_TEXT = [
    "<|eot_id|>",
    "before <|start_header_id|>user<|end_header_id|>\n\n after",
    "<|begin_of_text|><|python_tag|>code<|eom_id|>",
    "<|reserved_special_token_5|> and <|image|>",
]


@pytest.fixture(scope="module")
def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def test_vocab_and_special_ids(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128_256
    assert is_llama3(tok)
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_245|>"]
    assert tok.convert_tokens_to_ids(named) == [128000, 128001, 128004, 128006, 128007, 128008, 128009, 128010, 128255]
    assert (BEGIN_OF_TEXT, PAD, START_HEADER, EOM, EOT, PYTHON_TAG) == (128000, 128004, 128006, 128008, 128009, 128010)


def test_literal_ids(llama3_tokenizer):
    assert encode_text(llama3_tokenizer, "Hello, world!") == [9906, 11, 1917, 0]
    assert encode_text(llama3_tokenizer, "\n\n") == [271]
    assert encode_text(llama3_tokenizer, "assistant") == [78191]


@pytest.mark.parametrize("text", BATTERY, ids=range(len(BATTERY)))
def test_encode_matches_meta(llama3_tokenizer, meta_tokenizer, text):
    expected = meta_tokenizer.encode(text, bos=False, eos=False)
    assert encode_text(llama3_tokenizer, text) == expected
    assert llama3_tokenizer.decode(expected) == text


def test_plain_hf_encode_matches_meta_below_the_cut(llama3_tokenizer, meta_tokenizer):
    for text in BATTERY[:17]:
        assert llama3_tokenizer.encode(text, add_special_tokens=False) == meta_tokenizer.encode(text, bos=False, eos=False)


@pytest.mark.parametrize("text", SPECIAL_TEXT)
def test_special_token_text_is_plain_text(llama3_tokenizer, meta_tokenizer, text):
    ids = encode_text(llama3_tokenizer, text)
    assert ids == meta_tokenizer.encode(text, bos=False, eos=False)
    assert all(i < 128_000 for i in ids)


def test_hf_default_would_parse_special_text(llama3_tokenizer):
    # why encode_text exists: HF's default turns the text into the control token
    assert llama3_tokenizer.encode("<|eot_id|>", add_special_tokens=False) == [EOT]
    assert encode_text(llama3_tokenizer, "<|eot_id|>") == [27, 91, 68, 354, 851, 91, 29]
