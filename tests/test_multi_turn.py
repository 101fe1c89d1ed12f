"""Multi-turn chats: every assistant turn supervised (`supervise_turns="all"`), user and system turns never; the
three accepted conversation forms give the same document; `supervise_turns="last"` is the single-response path."""

import pytest
import torch
from datasets import Dataset

from dfactory_hf.data.collators import MASKED, NOT_SUPERVISED, PackingCollator, PaddingCollator
from dfactory_hf.data.preprocessing import IGNORE_INDEX, prepare_dataset
from dfactory_hf.demo.tokenizer import load_demo_tokenizer

EOS, MASK, SYSTEM, USER, ASSISTANT = 1, 2, 4, 5, 6
TURNS = [("system", "Be brief."), ("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"), ("assistant", "4"),
         ("user", "Now 3+3?"), ("assistant", "It is 6.")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


def chars(text: str) -> list[int]:
    """Ids of plain printable text, computed independently of the tokenizer (id = ord(c) - 24)."""
    return [ord(c) - 24 for c in text]


def messages(turns=TURNS) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def prepare(tokenizer, rows, **kwargs):
    return prepare_dataset(Dataset.from_list(rows), tokenizer, block_size=4, max_seq_len=128, mask_token_id=MASK,
                           **kwargs)[0]


def expected_three_turn_document():
    """(input_ids, assistant_masks, prompt_length) of TURNS under the shipped template, built by hand."""
    pieces = [  # (ids, supervised)
        ([SYSTEM, *chars("Be brief."), USER, *chars("1+1?"), ASSISTANT], 0),
        ([*chars("2"), EOS], 1),  # the EOS the template writes after an earlier assistant turn is part of it
        ([USER, *chars("2+2?"), ASSISTANT], 0),
        ([*chars("4"), EOS], 1),
        ([USER, *chars("Now 3+3?"), ASSISTANT], 0),
        ([*chars("It is 6."), EOS], 1),  # the document's closing EOS
    ]
    ids = [i for piece, _ in pieces for i in piece]
    mask = [flag for piece, flag in pieces for _ in piece]
    fill = -len(ids) % 4
    return ids + [EOS] * fill, mask + [1] * fill, len(pieces[0][0])


def test_every_assistant_turn_of_a_three_turn_chat_is_marked(tokenizer):
    doc = prepare(tokenizer, [{"messages": messages()}])[0]
    input_ids, assistant_masks, prompt_length = expected_three_turn_document()
    assert doc["input_ids"] == input_ids
    assert doc["assistant_masks"] == assistant_masks
    assert doc["prompt_length"] == prompt_length
    supervised_text = tokenizer.decode([i for i, m in zip(doc["input_ids"], doc["assistant_masks"]) if m])
    assert supervised_text.replace("<|endoftext|>", "|") == "2|4|It is 6.||||"  # the EOS fill continues the turn


def test_every_assistant_token_is_masked_and_supervised_user_and_system_tokens_never(tokenizer):
    documents = prepare(tokenizer, [{"messages": messages()}])
    input_ids, assistant_masks, _ = expected_three_turn_document()
    assistant = torch.tensor(assistant_masks, dtype=torch.bool)
    # t = 1 masks every supervisable token: exactly the assistant turns.
    full = PaddingCollator(mask_token_id=MASK, pad_token_id=0, block_size=4, fixed_mask_rate=1.0)(list(documents))
    assert torch.equal(full["noisy_input_ids"][0] == MASK, assistant)
    assert torch.equal(full["labels"][0] != IGNORE_INDEX, assistant)
    assert torch.equal(full["labels"][0][assistant], torch.tensor(input_ids)[assistant])
    assert torch.equal(full["noisy_input_ids"][0][~assistant], torch.tensor(input_ids)[~assistant])
    # Random rates, complementary pairs, edits and kept-token supervision: never outside the assistant turns, and
    # each assistant turn is masked in some draw.
    collator = PackingCollator(mask_token_id=MASK, pad_token_id=0, block_size=4, max_seq_len=128,
                               complementary_masking=True, edit_noise_rate=0.3, edit_token_ids=tuple(range(8, 90)),
                               supervise_kept=True)
    masked_somewhere = torch.zeros_like(assistant)
    for epoch in range(8):
        collator.set_epoch(epoch)
        batch = collator(list(documents))
        for row_start in (0, len(input_ids)):  # the pair lands in one packed row
            kind = batch["noise_kind"][0, row_start : row_start + len(input_ids)]
            noisy = batch["noisy_input_ids"][0, row_start : row_start + len(input_ids)]
            assert (kind[~assistant] == NOT_SUPERVISED).all()
            assert torch.equal(noisy[~assistant], torch.tensor(input_ids)[~assistant])
            assert (kind[assistant] != NOT_SUPERVISED).all()  # supervise_kept: masked, edited or kept
            masked_somewhere |= kind == MASKED
    assert torch.equal(masked_somewhere, assistant)


def test_the_three_conversation_forms_give_the_same_document(tokenizer):
    sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
    chat = {"messages": messages()}
    sharegpt = {"conversations": [{"from": sharegpt_role[role], "value": content} for role, content in TURNS]}
    prompt_completion = {"prompt": messages(TURNS[:2]), "completion": messages(TURNS[2:])}
    documents = [prepare(tokenizer, [row])[0] for row in (chat, sharegpt, prompt_completion)]
    input_ids, assistant_masks, prompt_length = expected_three_turn_document()
    for doc in documents:
        assert (doc["input_ids"], doc["assistant_masks"], doc["prompt_length"]) == (
            input_ids, assistant_masks, prompt_length)


def test_a_conversational_prompt_is_never_supervised(tokenizer):
    # As in TRL: the prompt's assistant turns are context; the completion's are supervised.
    documents = prepare(tokenizer, [{"prompt": messages(TURNS[:6]), "completion": messages(TURNS[6:])}])
    assert "assistant_masks" not in documents.column_names  # one supervised span: everything after the prompt
    doc = documents[0]
    assert tokenizer.decode(doc["input_ids"][: doc["prompt_length"]]).endswith("<|user|>Now 3+3?<|assistant|>")
    assert doc["input_ids"][doc["prompt_length"]:] == [*chars("It is 6."), EOS, EOS, EOS, EOS]


def test_supervise_turns_last_is_the_single_response_document(tokenizer):
    documents = prepare(tokenizer, [{"messages": messages()}], supervise_turns="last")
    assert "assistant_masks" not in documents.column_names
    input_ids, _, _ = expected_three_turn_document()
    doc = documents[0]
    assert doc["input_ids"] == input_ids
    prompt = [SYSTEM, *chars("Be brief."), USER, *chars("1+1?"), ASSISTANT, *chars("2"), EOS, USER, *chars("2+2?"),
              ASSISTANT, *chars("4"), EOS, USER, *chars("Now 3+3?"), ASSISTANT]
    assert doc["prompt_length"] == len(prompt)
    assert doc["input_ids"][doc["prompt_length"]:] == [*chars("It is 6."), EOS, EOS, EOS, EOS]


def test_single_turn_documents_and_noise_are_unchanged_by_the_multi_turn_path(tokenizer):
    single = [{"messages": messages([("user", f"{a}+{a}?"), ("assistant", f"It is {2 * a}.")])} for a in range(6)]
    by_mode = {mode: prepare(tokenizer, single, supervise_turns=mode) for mode in ("all", "last")}
    assert by_mode["all"].column_names == by_mode["last"].column_names  # no assistant_masks column
    assert by_mode["all"].to_list() == by_mode["last"].to_list()
    # A dataset mixing in one multi-turn chat carries assistant_masks; its single-turn documents still get exactly
    # the noise they get without the column.
    mixed = prepare(tokenizer, single + [{"messages": messages()}])
    assert "assistant_masks" in mixed.column_names
    collator = PaddingCollator(mask_token_id=MASK, pad_token_id=0, block_size=4, complementary_masking=True)
    with_masks = collator(mixed.to_list()[:6])
    without = collator(by_mode["last"].to_list())
    assert sorted(with_masks) == sorted(without)
    for key in without:
        assert torch.equal(with_masks[key], without[key]), key


def test_bad_supervise_turns_is_refused_naming_the_value(tokenizer):
    with pytest.raises(ValueError, match=r"supervise_turns \('first'\) must be one of \('all', 'last'\)"):
        prepare(tokenizer, [{"messages": messages()}], supervise_turns="first")


def test_a_template_whose_turns_are_not_prefixes_is_skipped_and_counted(tokenizer):
    odd = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Renders the whole conversation in reverse: no earlier turn is a prefix of it.
    odd.chat_template = ("{%- for m in messages|reverse -%}{{ '<|' + m['role'] + '|>' + m['content'] }}{%- endfor -%}"
                         "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")
    rows = [{"messages": messages()}, {"messages": messages(TURNS[:3])}]
    documents, report = prepare_dataset(Dataset.from_list(rows), odd, block_size=4, max_seq_len=128,
                                        mask_token_id=MASK)
    assert len(documents) == 1
    assert [reason for reason in report.skipped] == [
        "the chat template does not render the first turns as a prefix of the whole conversation, so the assistant "
        "turns cannot be located (use --supervise_turns last)"]


def test_the_trainer_supervises_every_assistant_turn_by_default(tmp_path):
    from trainer_helpers import demo_trainer

    turns = [("user", "one and one?"), ("assistant", "2"), ("user", "and two and two?"), ("assistant", "4")]
    data = {"train": Dataset.from_list([{"messages": messages(turns)}] * 8), "test": None}
    by_mode = {mode: demo_trainer(tmp_path / mode, data=data, supervise_turns=mode, max_steps=2)
               for mode in ("all", "last")}
    assert "assistant_masks" in by_mode["all"].train_dataset.column_names
    assert "assistant_masks" not in by_mode["last"].train_dataset.column_names
    supervised = {}
    for mode, trainer in by_mode.items():
        labels = next(iter(trainer.get_train_dataloader()))["labels"]
        supervised[mode] = set(labels[labels != IGNORE_INDEX].tolist())
    assert supervised["all"] == {*chars("24"), EOS}  # both answers, never a user token
    assert supervised["last"] == {*chars("4"), EOS}
    assert by_mode["all"].train().training_loss > 0


def test_the_elbo_counts_only_assistant_tokens(tmp_path):
    from trainer_helpers import demo_trainer

    # At t = 1 every supervisable token is masked, so the ELBO's per-token term equals the loss at t = 1 exactly
    # when its normaliser counts the assistant tokens (and not the user turns between them).
    chats = Dataset.from_list([{"messages": messages()}] * 4)
    trainer = demo_trainer(tmp_path, data={"train": chats, "test": chats}, eval_mask_rates=[1.0])
    assert "assistant_masks" in trainer.eval_dataset.column_names
    metrics = trainer.evaluate()
    assert metrics["eval_elbo_nll"] == pytest.approx(metrics["eval_loss_t1"], rel=1e-6)


def test_pre_tokenized_rows_may_carry_their_own_assistant_masks(tokenizer):
    input_ids, assistant_masks, prompt_length = expected_three_turn_document()
    row = {"input_ids": input_ids, "prompt_length": prompt_length, "assistant_masks": assistant_masks}
    bad = {"input_ids": input_ids, "prompt_length": prompt_length, "assistant_masks": [1] * len(input_ids)}
    documents, report = prepare_dataset(Dataset.from_list([row, bad]), tokenizer, block_size=4, max_seq_len=128,
                                        mask_token_id=MASK)
    assert (documents[0]["input_ids"], documents[0]["assistant_masks"]) == (input_ids, assistant_masks)
    assert dict(report.skipped) == {"assistant_masks marks a prompt token (before prompt_length)": 1}
