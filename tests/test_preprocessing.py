"""Rows -> documents: every accepted format, EOS fill to block_size, data problems skipped and counted."""

import copy

import pytest
from datasets import Dataset

from dfactory_hf.data.preprocessing import IGNORE_INDEX, prepare_dataset
from dfactory_hf.demo.arithmetic import make_arithmetic_dataset
from dfactory_hf.demo.tokenizer import load_demo_tokenizer

EOS, MASK, SYSTEM, USER, ASSISTANT = 1, 2, 4, 5, 6
EOS_TEXT = "<|endoftext|>"
QUESTION = "What is 37 + 48?"
ANSWER = "37 + 48 = 85. The answer is 85."


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


def chars(text: str) -> list[int]:
    """Ids of plain printable text, computed independently of the tokenizer (id = ord(c) - 24)."""
    assert all(" " <= c <= "~" for c in text)
    return [ord(c) - 24 for c in text]


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def prepare(tokenizer, rows, *, block_size=4, max_seq_len=128, **kwargs):
    return prepare_dataset(Dataset.from_list(rows), tokenizer, block_size=block_size, max_seq_len=max_seq_len,
                           mask_token_id=MASK, **kwargs)


def filled(ids: list[int], block_size: int, fill: int = EOS) -> list[int]:
    return ids + [fill] * (-len(ids) % block_size)


# --- formats ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 4, 7, 32])
def test_chat_row_is_prompt_answer_eos_filled_to_block(tokenizer, block_size):
    documents, report = prepare(tokenizer, [chat(("user", QUESTION), ("assistant", ANSWER))], block_size=block_size,
                                max_seq_len=block_size * (128 // block_size))
    doc = documents[0]
    prompt = [USER, *chars(QUESTION), ASSISTANT]
    expected = filled(prompt + chars(ANSWER) + [EOS], block_size)
    assert doc["input_ids"] == expected
    assert len(doc["input_ids"]) % block_size == 0
    assert doc["prompt_length"] == len(prompt)
    assert doc["num_tokens"] == len(doc["input_ids"])
    assert doc["sample_index"] == 0
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                             tokenize=False)
    assert doc["prompt_length"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    num_eos = len(expected) - len(prompt) - len(ANSWER)
    assert 1 <= num_eos <= block_size
    assert tokenizer.decode(doc["input_ids"]) == f"<|user|>{QUESTION}<|assistant|>{ANSWER}" + EOS_TEXT * num_eos
    assert (report.num_rows, report.num_documents, report.num_truncated, dict(report.skipped)) == (1, 1, 0, {})


def test_multi_turn_only_last_assistant_turn_is_the_response(tokenizer):
    row = chat(("system", "Be brief."), ("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"), ("assistant", "4"))
    doc = prepare(tokenizer, [row], supervise_turns="last")[0][0]  # the default, "all", supervises both turns
    prompt = [SYSTEM, *chars("Be brief."), USER, *chars("1+1?"), ASSISTANT, *chars("2"), EOS,
              USER, *chars("2+2?"), ASSISTANT]
    assert doc["prompt_length"] == len(prompt)
    assert doc["input_ids"] == filled(prompt + chars("4") + [EOS], 4)
    assert tokenizer.decode(doc["input_ids"][: doc["prompt_length"]]) == (
        f"<|system|>Be brief.<|user|>1+1?<|assistant|>2{EOS_TEXT}<|user|>2+2?<|assistant|>")


def test_system_message_is_part_of_the_prompt(tokenizer):
    doc = prepare(tokenizer, [chat(("system", "You add."), ("user", "1+2?"), ("assistant", "3"))])[0][0]
    assert doc["input_ids"][: doc["prompt_length"]] == [SYSTEM, *chars("You add."), USER, *chars("1+2?"), ASSISTANT]
    assert doc["input_ids"][doc["prompt_length"]:] == [*chars("3"), EOS, EOS, EOS, EOS]  # 15 + 2 -> 20


def test_prompt_completion_plain_strings(tokenizer):
    doc = prepare(tokenizer, [{"prompt": "2+3=", "completion": "5"}])[0][0]
    assert doc["input_ids"] == chars("2+3=") + chars("5") + [EOS, EOS, EOS]
    assert doc["prompt_length"] == 4


def test_prompt_completion_conversational_matches_chat(tokenizer):
    row = {"prompt": [{"role": "user", "content": QUESTION}], "completion": [{"role": "assistant", "content": ANSWER}]}
    conversational = prepare(tokenizer, [row])[0][0]
    as_chat = prepare(tokenizer, [chat(("user", QUESTION), ("assistant", ANSWER))])[0][0]
    assert conversational["input_ids"] == as_chat["input_ids"]
    assert conversational["prompt_length"] == as_chat["prompt_length"] == len(QUESTION) + 2


def test_pre_tokenized_appends_eos_if_missing_then_fills(tokenizer):
    rows = [{"input_ids": [10, 11, 12, 13, 14], "prompt_length": 2},
            {"input_ids": [10, 11, 12, EOS], "prompt_length": 2},  # already ends with EOS: nothing appended
            {"input_ids": [10, 11, 12, 13], "prompt_length": 0}]
    documents, _ = prepare(tokenizer, rows)
    assert documents["input_ids"] == [[10, 11, 12, 13, 14, EOS, EOS, EOS], [10, 11, 12, EOS],
                                      [10, 11, 12, 13, EOS, EOS, EOS, EOS]]
    assert documents["prompt_length"] == [2, 2, 0]
    assert "noisy_input_ids" not in documents.column_names and "labels" not in documents.column_names


def test_pre_tokenized_with_given_noise_is_used_as_is(tokenizer):
    rows = [{"input_ids": [10, 11, 12, 13, 14], "prompt_length": 2, "noisy_input_ids": [10, 11, MASK, 13, MASK],
             "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX, 14]},
            {"input_ids": [20, 21, 22, 23], "prompt_length": 1, "noisy_input_ids": [20, MASK, 22, 23],
             "labels": [IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]}]
    documents, _ = prepare(tokenizer, rows)
    # No EOS appended (a length-4 row stays 4 long); block fill is EOS in both id lists and -100 in labels.
    assert documents["input_ids"] == [[10, 11, 12, 13, 14, EOS, EOS, EOS], [20, 21, 22, 23]]
    assert documents["noisy_input_ids"] == [[10, 11, MASK, 13, MASK, EOS, EOS, EOS], [20, MASK, 22, 23]]
    assert documents["labels"] == [[IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX, 14] + [IGNORE_INDEX] * 3,
                                   [IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]]
    assert documents["prompt_length"] == [2, 1]


def test_pre_tokenized_noise_without_labels_derives_them_from_the_mask(tokenizer):
    rows = [{"input_ids": [10, 11, 12, 13, 14, 15], "prompt_length": 2,
             "noisy_input_ids": [10, 11, MASK, 13, MASK, 15]}]
    doc = prepare(tokenizer, rows)[0][0]
    assert doc["noisy_input_ids"] == [10, 11, MASK, 13, MASK, 15, EOS, EOS]
    assert doc["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX, 14, IGNORE_INDEX, IGNORE_INDEX,
                             IGNORE_INDEX]


def test_text_rows_have_no_prompt(tokenizer):
    documents, _ = prepare(tokenizer, [{"text": "hello"}, {"text": "abc"}], block_size=8)
    assert documents["input_ids"] == [chars("hello") + [EOS, EOS, EOS], chars("abc") + [EOS] * 5]
    assert documents["prompt_length"] == [0, 0]


def test_answer_column_is_kept_and_num_tokens_is_the_length(tokenizer):
    train = make_arithmetic_dataset(12, 1, seed=3, task="mixed")["train"]
    documents, report = prepare_dataset(train, tokenizer, block_size=8, max_seq_len=1024, mask_token_id=MASK)
    assert set(documents.column_names) == {"input_ids", "prompt_length", "sample_index", "num_tokens", "answer"}
    assert documents["answer"] == train["answer"]
    assert documents["sample_index"] == list(range(12))
    for doc, row in zip(documents, train):
        assert doc["num_tokens"] == len(doc["input_ids"]) and doc["num_tokens"] % 8 == 0
        response = tokenizer.decode(doc["input_ids"][doc["prompt_length"]:])
        assert response.startswith(row["messages"][-1]["content"] + EOS_TEXT)
    assert report.num_documents == 12
    again, again_report = prepare_dataset(documents, tokenizer, block_size=8, max_seq_len=1024, mask_token_id=MASK)
    assert again is documents and again_report.num_documents == 12  # already prepared: passed through


# --- data problems: skipped and counted, never raised ------------------------------------------------------------

GOOD = chat(("user", "1+2?"), ("assistant", "3"))
PROBLEMS = {
    "conversation has no assistant turn": chat(("user", "1+2?")),
    "empty assistant content": chat(("user", "1+2?"), ("assistant", "  ")),
    "a message lacks the role or content key": {"messages": [{"role": "user"}, {"role": "assistant", "content": "3"}]},
    "messages is not a non-empty list": {"messages": None},
    "conversation has no prompt before the assistant turn": chat(("assistant", "3"), ("user", "thanks")),
    "the mask token (id 2) appears inside the data": chat(("user", "1+<|mask|>?"), ("assistant", "3")),
    "prompt longer than max_seq_len (32) leaves no room for a response": chat(("user", "x" * 40), ("assistant", "3")),
    "document longer than max_seq_len (32)": chat(("user", "1+2?"), ("assistant", "y" * 40)),
    "the chat template rejected the conversation": chat(("tool", "1+2?"), ("assistant", "3")),
}


@pytest.mark.parametrize("reason", list(PROBLEMS))
def test_each_data_problem_is_skipped_with_its_reason(tokenizer, reason):
    documents, report = prepare(tokenizer, [GOOD, PROBLEMS[reason], GOOD], max_seq_len=32)
    assert documents["sample_index"] == [0, 2]
    assert dict(report.skipped) == {reason: 1}
    assert report.first_row_of == {reason: 1}
    assert (report.num_rows, report.num_documents) == (3, 2)
    assert f"skipped 1: {reason} (first at row 1)" in report.summary()


def test_mixed_dataset_counts_every_problem_and_keeps_exactly_the_good_rows(tokenizer):
    names = ["good", "conversation has no assistant turn", "empty assistant content", "good",
             "a message lacks the role or content key", "the mask token (id 2) appears inside the data",
             "conversation has no assistant turn", "messages is not a non-empty list",
             "prompt longer than max_seq_len (32) leaves no room for a response", "good",
             "document longer than max_seq_len (32)", "empty assistant content", "good"]
    good_rows = {3: chat(("user", "9+9?"), ("assistant", "18")), 9: chat(("user", "a"), ("assistant", "b"))}
    rows = [good_rows.get(i, GOOD) if name == "good" else PROBLEMS[name] for i, name in enumerate(names)]
    documents, report = prepare(tokenizer, rows, max_seq_len=32)
    assert documents["sample_index"] == [0, 3, 9, 12]
    assert documents["input_ids"][1] == filled([USER, *chars("9+9?"), ASSISTANT, *chars("18"), EOS], 4)
    assert documents["input_ids"][2] == [USER, *chars("a"), ASSISTANT, *chars("b"), EOS, EOS, EOS, EOS]
    assert dict(report.skipped) == {
        "conversation has no assistant turn": 2, "empty assistant content": 2,
        "a message lacks the role or content key": 1, "the mask token (id 2) appears inside the data": 1,
        "messages is not a non-empty list": 1, "prompt longer than max_seq_len (32) leaves no room for a response": 1,
        "document longer than max_seq_len (32)": 1}
    assert report.first_row_of == {
        "conversation has no assistant turn": 1, "empty assistant content": 2,
        "a message lacks the role or content key": 4, "the mask token (id 2) appears inside the data": 5,
        "messages is not a non-empty list": 7, "prompt longer than max_seq_len (32) leaves no room for a response": 8,
        "document longer than max_seq_len (32)": 10}
    assert (report.num_rows, report.num_documents, report.num_truncated) == (13, 4, 0)
    assert report.to_dict()["skipped"]["empty assistant content"] == 2


def test_overlong_truncate_keeps_exactly_max_seq_len_tokens(tokenizer):
    long_row = chat(("user", "1+2?"), ("assistant", "y" * 40))
    full = [USER, *chars("1+2?"), ASSISTANT, *chars("y" * 40), EOS]
    documents, report = prepare(tokenizer, [GOOD, long_row], max_seq_len=32, overlong_policy="truncate")
    assert documents["sample_index"] == [0, 1]
    assert documents["input_ids"][1] == full[:32]
    assert documents["prompt_length"][1] == 6
    assert (report.num_truncated, report.num_documents, dict(report.skipped)) == (1, 2, {})
    assert "truncated to max_seq_len: 1" in report.summary()
    # A prompt longer than max_seq_len is skipped even when truncating.
    reason = "prompt longer than max_seq_len (32) leaves no room for a response"
    _, report = prepare(tokenizer, [GOOD, PROBLEMS[reason]], max_seq_len=32, overlong_policy="truncate")
    assert dict(report.skipped) == {reason: 1}


def test_overlong_pre_tokenized_with_noise(tokenizer):
    row = {"input_ids": list(range(10, 22)), "prompt_length": 2, "noisy_input_ids": [10, 11] + [MASK] * 10}
    short = {"input_ids": [10, 11, 12, 13], "prompt_length": 1, "noisy_input_ids": [10, MASK, 12, 13]}
    documents, report = prepare(tokenizer, [short, row], max_seq_len=8, overlong_policy="truncate")
    assert documents["input_ids"][1] == list(range(10, 18))
    assert documents["noisy_input_ids"][1] == [10, 11] + [MASK] * 6
    assert documents["labels"][1] == [IGNORE_INDEX, IGNORE_INDEX] + list(range(12, 18))
    assert report.num_truncated == 1
    _, report = prepare(tokenizer, [short, row], max_seq_len=8)
    assert dict(report.skipped) == {"document longer than max_seq_len (8)": 1}


def test_pre_tokenized_problems_are_skipped(tokenizer):
    rows = [{"input_ids": [10, 11, 12, 13], "prompt_length": 1},
            {"input_ids": [10, 11], "prompt_length": 2},
            {"input_ids": [10, MASK, 12], "prompt_length": 1}]
    documents, report = prepare(tokenizer, rows)
    assert documents["sample_index"] == [0]
    assert dict(report.skipped) == {"prompt_length is not in [0, len(input_ids))": 1,
                                    "the mask token (id 2) appears inside the data": 1}


def test_conversational_prompt_completion_problems_are_skipped(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
            {"prompt": [{"role": "user", "content": "q"}], "completion": []},
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": ""}]}]
    documents, report = prepare(tokenizer, rows)
    assert documents["sample_index"] == [0]
    assert dict(report.skipped) == {
        "conversational prompt/completion must both be non-empty message lists": 1, "empty assistant content": 1}


# --- whole-dataset errors -------------------------------------------------------------------------------------


def test_unrecognised_columns_raise_naming_the_columns(tokenizer):
    with pytest.raises(ValueError, match=r"The dataset has columns \['question', 'reply'\], none of the accepted "
                                         r"formats \(chat: messages; prompt-completion: prompt, completion;"):
        prepare(tokenizer, [{"question": "a", "reply": "b"}])


def test_empty_dataset_raises(tokenizer):
    empty = Dataset.from_dict({"messages": []})
    with pytest.raises(ValueError, match=r"^The validation dataset is empty; pass a dataset with at least one row\.$"):
        prepare_dataset(empty, tokenizer, block_size=4, max_seq_len=32, mask_token_id=MASK, split="validation")


def test_all_rows_skipped_raises_with_the_report(tokenizer):
    with pytest.raises(ValueError) as error:
        prepare(tokenizer, [PROBLEMS["conversation has no assistant turn"], PROBLEMS["empty assistant content"]])
    message = str(error.value)
    assert message.startswith("No usable rows in the train dataset.\n[dfactory_hf] train data: 0 documents from 2 rows")
    assert "skipped 1: conversation has no assistant turn (first at row 0)" in message
    assert "skipped 1: empty assistant content (first at row 1)" in message


def test_tokenizer_without_eos_raises(tokenizer):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match=r"^The tokenizer has no eos_token; set tokenizer\.eos_token"):
        prepare(no_eos, [GOOD])


def test_max_seq_len_must_be_a_multiple_of_block_size(tokenizer):
    with pytest.raises(ValueError, match=r"max_seq_len \(100\) must be a multiple of block_size \(32\)"):
        prepare(tokenizer, [chat(("user", QUESTION), ("assistant", ANSWER))], block_size=32, max_seq_len=100)
