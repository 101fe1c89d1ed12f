"""The shipped character-level tokenizer: ids, offline loading, prefix property, chat template.

    python -m pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import random

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dfactory_hf.demo.arithmetic import make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import DEMO_TOKENIZER_PATH, load_demo_tokenizer, save_demo_tokenizer

ASCII_CHARACTERS = "\n" + "".join(chr(code) for code in range(ord(" "), ord("~") + 1))


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


def test_loads_offline_with_auto_tokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TOKENIZER_PATH)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 103
    assert tokenizer.chat_template is not None


def test_committed_files_match_the_builder(tmp_path):
    save_demo_tokenizer(tmp_path)
    committed = sorted(path.name for path in DEMO_TOKENIZER_PATH.iterdir())
    assert committed == sorted(path.name for path in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DEMO_TOKENIZER_PATH / name).read_bytes(), (
            f"{name} is stale; run `python -m dfactory_hf.demo.tokenizer`"
        )


def test_special_token_ids_are_the_documented_ones(tokenizer):
    ids = {
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
        "system": tokenizer.convert_tokens_to_ids("<|system|>"),
        "user": tokenizer.convert_tokens_to_ids("<|user|>"),
        "assistant": tokenizer.convert_tokens_to_ids("<|assistant|>"),
    }
    assert ids == {"pad": 0, "eos": 1, "mask": 2, "unk": 3, "system": 4, "user": 5, "assistant": 6}
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token is None
    assert set(tokenizer.all_special_ids) == set(ids.values())
    # Each special string is a single id, also when it appears inside text.
    for token in ["<|pad|>", "<|endoftext|>", "<|mask|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>"]:
        assert tokenizer.encode(f"a{token}b") == [tokenizer.convert_tokens_to_ids(c) for c in ("a", token, "b")]


def test_every_ascii_character_is_one_token_below_128(tokenizer):
    ids = [tokenizer.encode(character) for character in ASCII_CHARACTERS]
    assert all(len(single) == 1 for single in ids)
    flat = [single[0] for single in ids]
    assert len(set(flat)) == len(ASCII_CHARACTERS)
    assert tokenizer.unk_token_id not in flat
    assert max(flat + tokenizer.all_special_ids) < 128
    assert [tokenizer.encode(digit)[0] for digit in "0123456789"] == list(range(24, 34))


def test_no_special_tokens_are_added_by_encoding(tokenizer):
    assert tokenizer("12 + 3")["input_ids"] == tokenizer.encode("12 + 3", add_special_tokens=False)
    assert len(tokenizer("12 + 3")["input_ids"]) == 6


def test_unknown_characters_map_to_one_unk_each(tokenizer):
    unk = tokenizer.unk_token_id
    assert tokenizer.encode("a\u00e9\u20acb\t") == [tokenizer.encode("a")[0], unk, unk, tokenizer.encode("b")[0], unk]


def test_tokens_of_a_prefix_are_a_prefix_of_the_tokens(tokenizer):
    rng = random.Random(0)
    for _ in range(30):
        text = "".join(rng.choice(ASCII_CHARACTERS + "    0123456789") for _ in range(rng.randint(1, 60)))
        full = tokenizer.encode(text)
        assert len(full) == len(text)
        for cut in range(len(text) + 1):
            assert tokenizer.encode(text[:cut]) == full[:cut]


def test_decode_round_trips_ascii_text(tokenizer):
    texts = [
        ASCII_CHARACTERS,
        "  37 + 48 = 85 .  The answer is 85 ,  isn 't it ?\n\n",
        "Mia's \"3\" apples ; cost $12 (each)!",
    ]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("ab") + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    assert tokenizer.decode(ids) == "ab<|endoftext|><|pad|>"


def test_chat_template_exact_render(tokenizer):
    messages = [
        {"role": "user", "content": "What is 37 + 48?"},
        {"role": "assistant", "content": "37 + 48 = 85. The answer is 85."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|user|>What is 37 + 48?<|assistant|>37 + 48 = 85. The answer is 85."
    )
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>What is 37 + 48?<|assistant|>"
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(with_system, tokenize=False).startswith("<|system|>Be brief.<|user|>")


def _conversations() -> list[list[dict[str, str]]]:
    rows = make_arithmetic_dataset(40, 0, seed=1, task="mixed")["train"]["messages"]
    system = [{"role": "system", "content": "You solve arithmetic. "}]
    multi_turn = [*rows[0], *rows[1]]
    edge = [{"role": "user", "content": " spaces \n"}, {"role": "assistant", "content": "\n x \n"}]
    return [*rows, *[system + row for row in rows[:10]], multi_turn, edge]


def test_generation_prompt_is_a_prefix_of_the_full_render(tokenizer):
    for messages in _conversations():
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        assert full == prompt + messages[-1]["content"]  # nothing follows the answer, not even EOS
        prompt_ids = tokenizer.encode(prompt)
        full_ids = tokenizer.encode(full)
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[len(prompt_ids) :] == tokenizer.encode(messages[-1]["content"])
        assert full_ids[-1] != tokenizer.eos_token_id
        assert prompt_ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_earlier_assistant_turns_end_with_eos(tokenizer):
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    expected = "<|user|>1+1?<|assistant|>2<|endoftext|><|user|>2+2?<|assistant|>4"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_unknown_role_is_rejected(tokenizer):
    with pytest.raises(TemplateError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
