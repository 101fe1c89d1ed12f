"""Dataset rows -> documents (see docs/design.md, "A document").

Accepted row formats, detected from the column names:

| format | columns | prompt / response |
|---|---|---|
| chat | `messages` | all turns before the last assistant turn / that turn (chat template applied) |
| prompt-completion | `prompt`, `completion` | strings, or message lists (chat template applied, as in TRL) |
| pre-tokenized | `input_ids`, `prompt_length` (+ optional `noisy_input_ids`, `labels`) | as given |
| text | `text` | none / the whole text |

Each document is prompt + response + EOS, EOS-filled to a multiple of `block_size`. Rows with data problems
(no assistant turn, empty content, missing keys, the mask token inside the data, a prompt that leaves no room
for a response, an over-long document under the "skip" policy) are skipped and counted, never crash the run;
`DataReport` says what was dropped and where the first case of each kind was.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset
from jinja2 import TemplateError

IGNORE_INDEX = -100
FORMATS = {
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "pre-tokenized": ("input_ids", "prompt_length"),
    "text": ("text",),
}


class SkipRow(Exception):
    """A data problem in one row: the row is skipped and counted under `reason`."""


@dataclass
class DataReport:
    split: str
    num_rows: int = 0
    num_documents: int = 0
    num_truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_row_of: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"[dfactory_hf] {self.split} data: {self.num_documents} documents from {self.num_rows} rows"]
        if self.num_truncated:
            lines.append(f"  truncated to max_seq_len: {self.num_truncated}")
        for reason, count in self.skipped.most_common():
            lines.append(f"  skipped {count}: {reason} (first at row {self.first_row_of[reason]})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"split": self.split, "num_rows": self.num_rows, "num_documents": self.num_documents,
                "num_truncated": self.num_truncated, "skipped": dict(self.skipped), "first_row_of": self.first_row_of}


def detect_format(column_names) -> str:
    names = set(column_names)
    for name, required in FORMATS.items():
        if set(required) <= names:
            return name
    accepted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMATS.items())
    raise ValueError(f"The dataset has columns {sorted(names)}, none of the accepted formats ({accepted}). "
                     "Rename the columns, or pre-tokenize into input_ids + prompt_length.")


@dataclass
class DocumentBuilder:
    """Callable for `Dataset.map(with_indices=True)`: one row -> one document (or a skip reason)."""

    tokenizer: object
    block_size: int
    max_seq_len: int
    mask_token_id: int
    eos_token_id: int
    overlong_policy: str = "skip"
    row_format: str = "chat"

    def __call__(self, row: dict, index: int) -> dict:
        out = {"input_ids": [], "prompt_length": 0, "sample_index": index, "skip_reason": "", "truncated": False,
               "noisy_input_ids": [], "labels": []}
        try:
            out.update(self.build(row))
        except SkipRow as problem:
            out["skip_reason"] = str(problem)
        out["num_tokens"] = len(out["input_ids"])
        return out

    def build(self, row: dict) -> dict:
        if self.row_format == "pre-tokenized":
            return self._pre_tokenized(row)
        if self.row_format == "chat":
            prompt_ids, response_ids = self._chat(row.get("messages"))
        elif self.row_format == "prompt-completion":
            prompt_ids, response_ids = self._prompt_completion(row.get("prompt"), row.get("completion"))
        else:
            prompt_ids, response_ids = [], self._encode(_require_text(row.get("text"), "text"))
        return self._document(prompt_ids, response_ids)

    # --- formats ---------------------------------------------------------------------------------------------

    def _chat(self, messages) -> tuple[list[int], list[int]]:
        if not isinstance(messages, list) or not messages:
            raise SkipRow("messages is not a non-empty list")
        _require_messages(messages)
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_turns:
            raise SkipRow("conversation has no assistant turn")
        last = assistant_turns[-1]
        if last == 0:
            raise SkipRow("conversation has no prompt before the assistant turn")
        return self._templated(messages[:last], [messages[last]])

    def _prompt_completion(self, prompt, completion) -> tuple[list[int], list[int]]:
        if isinstance(prompt, list) or isinstance(completion, list):
            if not isinstance(prompt, list) or not isinstance(completion, list) or not prompt or not completion:
                raise SkipRow("conversational prompt/completion must both be non-empty message lists")
            _require_messages(prompt + completion)
            return self._templated(prompt, completion)
        return self._encode(_require_text(prompt, "prompt")), self._encode(_require_text(completion, "completion"))

    def _templated(self, prompt_messages: list, response_messages: list) -> tuple[list[int], list[int]]:
        for message in response_messages:
            _require_text(message.get("content"), "assistant content")
        try:
            prompt_text = self.tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True,
                                                             tokenize=False)
            full_text = self.tokenizer.apply_chat_template(prompt_messages + response_messages, tokenize=False)
        except TemplateError:  # e.g. a role the template refuses: a data problem of this row, not of the run
            raise SkipRow("the chat template rejected the conversation") from None
        if full_text.startswith(prompt_text):
            response_text = full_text[len(prompt_text):]
        else:  # a template whose prompt render is not a prefix of the full render: take the content as is
            response_text = "".join(m["content"] for m in response_messages)
        return self._encode(prompt_text), self._encode(response_text)

    def _pre_tokenized(self, row: dict) -> dict:
        input_ids, prompt_length = list(row["input_ids"]), row["prompt_length"]
        if not input_ids or not isinstance(prompt_length, int) or not 0 <= prompt_length < len(input_ids):
            raise SkipRow("prompt_length is not in [0, len(input_ids))")
        noisy = row.get("noisy_input_ids")
        if noisy is None:
            response = input_ids[prompt_length:]
            return self._document(input_ids[:prompt_length], response)
        # The path-distillation format: noise given, used as is (no EOS appended), only block-filled.
        noisy = list(noisy)
        labels = row.get("labels")
        labels = list(labels) if labels is not None else [
            clean if noisy_id == self.mask_token_id else IGNORE_INDEX for clean, noisy_id in zip(input_ids, noisy)]
        if len(noisy) != len(input_ids) or len(labels) != len(input_ids):
            raise SkipRow("noisy_input_ids or labels differ in length from input_ids")
        if self.mask_token_id in input_ids:
            raise SkipRow("the mask token appears inside input_ids")
        truncated = False
        if len(input_ids) > self.max_seq_len:
            if self.overlong_policy == "skip":
                raise SkipRow(f"document longer than max_seq_len ({self.max_seq_len})")
            input_ids, noisy, labels = (s[: self.max_seq_len] for s in (input_ids, noisy, labels))
            truncated = True
        fill = -len(input_ids) % self.block_size
        return {"input_ids": input_ids + [self.eos_token_id] * fill, "prompt_length": prompt_length,
                "noisy_input_ids": noisy + [self.eos_token_id] * fill, "labels": labels + [IGNORE_INDEX] * fill,
                "truncated": truncated}

    # --- shared ----------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _document(self, prompt_ids: list[int], response_ids: list[int]) -> dict:
        if self.mask_token_id in prompt_ids or self.mask_token_id in response_ids:
            raise SkipRow(f"the mask token (id {self.mask_token_id}) appears inside the data")
        if len(prompt_ids) >= self.max_seq_len:
            raise SkipRow(f"prompt longer than max_seq_len ({self.max_seq_len}) leaves no room for a response")
        if not response_ids or response_ids[-1] != self.eos_token_id:
            response_ids = response_ids + [self.eos_token_id]
        input_ids = prompt_ids + response_ids
        truncated = False
        if len(input_ids) > self.max_seq_len:
            if self.overlong_policy == "skip":
                raise SkipRow(f"document longer than max_seq_len ({self.max_seq_len})")
            input_ids, truncated = input_ids[: self.max_seq_len], True
        input_ids = input_ids + [self.eos_token_id] * (-len(input_ids) % self.block_size)
        return {"input_ids": input_ids, "prompt_length": len(prompt_ids), "truncated": truncated}


def _require_messages(messages: list) -> None:
    # Dataset.from_list / Arrow give every message all keys of the column's struct, a missing one as None.
    for message in messages:
        if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
            raise SkipRow("a message lacks the role or content key")


def _require_text(value, name: str) -> str:
    if value is None:
        raise SkipRow(f"missing {name}")
    if not isinstance(value, str) or not value.strip():
        raise SkipRow(f"empty {name}")
    return value


def is_prepared(dataset: Dataset) -> bool:
    return {"input_ids", "prompt_length", "sample_index", "num_tokens"} <= set(dataset.column_names)


def prepare_dataset(dataset: Dataset, tokenizer, *, block_size: int, max_seq_len: int, mask_token_id: int,
                    overlong_policy: str = "skip", num_proc: int | None = None,
                    split: str = "train") -> tuple[Dataset, DataReport]:
    """Tokenize and build documents; returns the kept documents and the report of what was dropped."""
    if is_prepared(dataset):
        return dataset, DataReport(split, len(dataset), len(dataset))
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty; pass a dataset with at least one row.")
    if block_size <= 0 or max_seq_len % block_size:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be a multiple of block_size ({block_size}).")
    row_format = detect_format(dataset.column_names)
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token (responses end with EOS).")
    builder = DocumentBuilder(tokenizer, block_size, max_seq_len, mask_token_id, eos_token_id, overlong_policy,
                              row_format)
    keep = [c for c in ("answer",) if c in dataset.column_names]
    drop = [c for c in dataset.column_names if c not in keep]
    built = dataset.map(builder, with_indices=True, remove_columns=drop, num_proc=num_proc,
                        desc=f"Building {split} documents")
    reasons = built["skip_reason"]
    report = DataReport(split, num_rows=len(dataset))
    for row, reason in enumerate(reasons):
        if reason:
            report.skipped[reason] += 1
            report.first_row_of.setdefault(reason, row)
    kept = built.filter(lambda reason: not reason, input_columns="skip_reason")
    report.num_documents = len(kept)
    report.num_truncated = sum(kept["truncated"])
    if report.num_documents == 0:
        raise ValueError(f"No usable rows in the {split} dataset.\n{report.summary()}")
    extra = ["skip_reason", "truncated"]
    if row_format != "pre-tokenized" or "noisy_input_ids" not in dataset.column_names:
        extra += ["noisy_input_ids", "labels"]
    return kept.remove_columns(extra), report


def save_report(reports: list[DataReport], path) -> None:
    with open(path, "w") as handle:
        json.dump([report.to_dict() for report in reports], handle, indent=2)
