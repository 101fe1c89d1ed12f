"""Dataset rows -> documents (see docs/design.md, "A document").

Accepted row formats, detected from the column names:

| format | columns | prompt / response |
|---|---|---|
| chat | `messages` | the turns before the first supervised assistant turn / every assistant turn from there on |
| ShareGPT | `conversations` (`from`/`value`, roles human/gpt) | as chat, once converted to `messages` |
| prompt-completion | `prompt`, `completion` | strings, or message lists (chat template applied, as in TRL) |
| pre-tokenized | `input_ids`, `prompt_length` (+ optional `noisy_input_ids`, `labels`, `assistant_masks`) | as given |
| text | `text` | none / the whole text |

Multi-turn chats (`supervise_turns`): "all" (default) supervises every assistant turn of `messages` /
`conversations` (of the completion, for conversational prompt-completion: the prompt is never supervised, as in
TRL); the user and system turns between them stay clean context, marked by the document's `assistant_masks` (1 =
an assistant token; the EOS the template writes right after a turn belongs to it). "last" supervises only the
last assistant turn, everything before it being the prompt. A dataset where no document has more than one
supervised span gets no `assistant_masks` column: its tokens and noise are exactly those of single-turn chats. The
turns are located by rendering growing prefixes of the conversation with the chat template, which works with any
template whose render of the first k messages is a prefix of the render of the whole conversation (checked; a row
where it is not is skipped and counted).

Each document is prompt + response + EOS, EOS-filled to a multiple of `block_size`. Rows with data problems
(no assistant turn, empty content, missing keys, a value of the wrong type, the mask token or control-token text
inside message content, token ids outside the model's or the tokenizer's vocabulary, given noise that supervises
nothing, a prompt that leaves no room for a response, an over-long document under the "skip" policy) are skipped
and counted, never crash the run; `DataReport` says what was dropped and where the first case of each kind was.
Each row is checked once, here: the collators and the model then only see ids they can embed. A dataset with no
usable row is refused with the report.

Message `content` may be a string or a list of text parts (`[{"type": "text", "text": ...}]`, the OpenAI
format), joined into one string; a part of another type skips the row. Plain-string formats (text, string
prompt-completion) may carry control-token text on purpose (a pre-rendered prompt): it is tokenized as control
tokens, and the report notes how many rows did.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset
from jinja2 import TemplateError
from trl.data_utils import maybe_convert_to_chatml

from ..diffusion.loss import IGNORE_INDEX

FORMATS = {
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "pre-tokenized": ("input_ids", "prompt_length"),
    "text": ("text",),
    "sharegpt": ("conversations",),
}
SUPERVISE_TURNS = ("all", "last")
# ShareGPT role names -> chat roles. TRL's maybe_convert_to_chatml renames the keys (from/value), not the roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
NOT_A_PREFIX = ("the chat template does not render the first turns as a prefix of the whole conversation, so the "
                "assistant turns cannot be located (use --supervise_turns last)")

UNSUPERVISED = ("the given noise supervises no position (labels all -100: no mask token in the response of "
                "noisy_input_ids)")


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
    noted: Counter = field(default_factory=Counter)  # kept rows the user should know about
    first_row_of_note: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"[dfactory_hf] {self.split} data: {self.num_documents} documents from {self.num_rows} rows"]
        if self.num_truncated:
            lines.append(f"  truncated to max_seq_len: {self.num_truncated}")
        for reason, count in self.skipped.most_common():
            lines.append(f"  skipped {count}: {reason} (first at row {self.first_row_of[reason]})")
        for note, count in self.noted.most_common():
            lines.append(f"  kept {count} with a note: {note} (first at row {self.first_row_of_note[note]})")
        return "\n".join(lines)

    @property
    def supervises_nothing(self) -> bool:
        return self.num_documents > 0 and self.noted.get(UNSUPERVISED, 0) == self.num_documents

    def to_dict(self) -> dict:
        return {"split": self.split, "num_rows": self.num_rows, "num_documents": self.num_documents,
                "num_truncated": self.num_truncated, "skipped": dict(self.skipped), "first_row_of": self.first_row_of,
                "noted": dict(self.noted), "first_row_of_note": self.first_row_of_note}


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
    model_vocab_size: int | None = None  # ids must embed: [0, model_vocab_size)
    tokenizer_vocab_size: int | None = None  # and decode: [0, len(tokenizer))
    supervise_turns: str = "all"  # multi-turn chats: every assistant turn, or the last one only

    def __post_init__(self):
        # Control tokens other than the mask token (which has its own reason, checked on the ids).
        specials = set(getattr(self.tokenizer, "all_special_tokens", []))
        specials |= {t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special}
        mask_text = self.tokenizer.convert_ids_to_tokens(self.mask_token_id)
        control_texts = sorted((t for t in specials if t and t != mask_text), key=lambda t: (-len(t), t))
        # One pass over each string whatever the number of control tokens (real tokenizers have hundreds).
        self.control_text = re.compile("|".join(map(re.escape, control_texts))) if control_texts else None

    def __call__(self, row: dict, index: int) -> dict:
        out = {"input_ids": [], "prompt_length": 0, "sample_index": index, "skip_reason": "", "truncated": False,
               "noisy_input_ids": [], "labels": [], "note": "", "assistant_masks": [],
               "multi_turn": False}
        self._note = ""
        try:
            out.update(self.build(row))
            self._check_vocabulary(out)
        except SkipRow as problem:
            out.update(input_ids=[], noisy_input_ids=[], labels=[], assistant_masks=[], prompt_length=0,
                       skip_reason=str(problem))
        out["note"] = self._note
        out["num_tokens"] = len(out["input_ids"])
        return out

    def build(self, row: dict) -> dict:
        if self.row_format == "pre-tokenized":
            return self._pre_tokenized(row)
        response_mask = None
        if self.row_format == "chat":
            prompt_ids, response_ids, response_mask = self._chat(row.get("messages"))
        elif self.row_format == "sharegpt":
            prompt_ids, response_ids, response_mask = self._chat(_sharegpt_messages(row.get("conversations")))
        elif self.row_format == "prompt-completion":
            prompt_ids, response_ids, response_mask = self._prompt_completion(row.get("prompt"), row.get("completion"))
        else:
            prompt_ids, response_ids = [], self._encode(self._plain(_require_text(row.get("text"), "text")))
        return self._document(prompt_ids, response_ids, response_mask)

    # --- formats ---------------------------------------------------------------------------------------------

    def _chat(self, messages) -> tuple[list[int], list[int], list[int] | None]:
        if not isinstance(messages, list) or not messages:
            raise SkipRow("messages is not a non-empty list")
        messages = self._messages(messages)
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_turns:
            raise SkipRow("conversation has no assistant turn")
        last = assistant_turns[-1]
        if last == 0:
            raise SkipRow("conversation has no prompt before the assistant turn")
        turns = [last] if self.supervise_turns == "last" else assistant_turns
        return self._templated(messages[: last + 1], [(turn, turn + 1) for turn in turns])

    def _prompt_completion(self, prompt, completion) -> tuple[list[int], list[int], list[int] | None]:
        if isinstance(prompt, list) or isinstance(completion, list):
            if not isinstance(prompt, list) or not isinstance(completion, list) or not prompt or not completion:
                raise SkipRow("conversational prompt/completion must both be non-empty message lists")
            messages = self._messages(prompt + completion)
            turns = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
            if self.supervise_turns == "last" or len(turns) < 2:  # the whole completion is the response
                return self._templated(messages, [(len(prompt), len(messages))])
            return self._templated(messages[: turns[-1] + 1], [(turn, turn + 1) for turn in turns])
        prompt, completion = _require_text(prompt, "prompt"), _require_text(completion, "completion")
        return self._encode(self._plain(prompt)), self._encode(self._plain(completion)), None

    def _templated(self, messages: list, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int] | None]:
        """Prompt ids, response ids and the response's assistant mask (None: all of it is supervised).

        spans: the supervised message ranges [first, end), in order; the response runs from the first one's
        start to the end of the render, the text between two spans (user turns) is context."""
        for first, end in spans:
            for message in messages[first:end]:
                _require_text(message.get("content"), "assistant content")
        try:
            full_text = self._render(messages, len(messages), generation_prompt=False)
            starts = [self._render(messages, first, generation_prompt=True) for first, _ in spans]
            ends = [self._render(messages, end, generation_prompt=False) for _, end in spans[:-1]]
        except TemplateError:  # e.g. a role the template refuses: a data problem of this row, not of the run
            raise SkipRow("the chat template rejected the conversation") from None
        if len(spans) == 1:
            prompt_text = starts[0]
            if full_text.startswith(prompt_text):
                response_text = full_text[len(prompt_text):]
            else:  # a template whose prompt render is not a prefix of the full render: take the content as is
                response_text = "".join(m["content"] for m in messages[spans[0][0]:])
            return self._encode(prompt_text), self._encode(response_text), None
        bounds = []  # character offsets in full_text: supervised [start, end) per span
        eos = self.tokenizer.eos_token or ""
        for k, start_text in enumerate(starts):
            end_text = ends[k] if k < len(ends) else full_text
            if not (full_text.startswith(start_text) and full_text.startswith(end_text)):
                raise SkipRow(NOT_A_PREFIX)
            start, end = len(start_text), len(end_text)
            if eos and k < len(ends) and full_text.startswith(eos, end):
                end += len(eos)  # the EOS closing an earlier turn: the model must learn to write it
            if start > end or (bounds and bounds[-1][1] > start):
                raise SkipRow(NOT_A_PREFIX)
            bounds.append((start, end))
        prompt_ids = self._encode(full_text[: bounds[0][0]])
        response_ids, response_mask = [], []
        for k, (start, end) in enumerate(bounds):
            context_end = bounds[k + 1][0] if k + 1 < len(bounds) else len(full_text)
            for text, supervised in ((full_text[start:end], 1), (full_text[end:context_end], 0)):
                ids = self._encode(text) if text else []
                response_ids += ids
                response_mask += [supervised] * len(ids)
        return prompt_ids, response_ids, response_mask

    def _render(self, messages: list, count: int, *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages[:count], add_generation_prompt=generation_prompt,
                                                  tokenize=False)

    def _pre_tokenized(self, row: dict) -> dict:
        input_ids, prompt_length = _integers(row["input_ids"], "input_ids"), row["prompt_length"]
        if not isinstance(prompt_length, bool) and isinstance(prompt_length, float) and prompt_length.is_integer():
            prompt_length = int(prompt_length)  # a column datasets inferred as float from a few rows
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
            raise SkipRow("prompt_length is not an integer")
        if not input_ids or not 0 <= prompt_length < len(input_ids):
            raise SkipRow("prompt_length is not in [0, len(input_ids))")
        noisy = row.get("noisy_input_ids")
        if noisy is None:
            response = input_ids[prompt_length:]
            return self._document(input_ids[:prompt_length], response, _given_assistant_masks(row, prompt_length))
        # The path-distillation format: noise given, used as is (no EOS appended), only block-filled.
        noisy = _integers(noisy, "noisy_input_ids")
        labels = row.get("labels")
        labels = _integers(labels, "labels") if labels is not None else [
            clean if noisy_id == self.mask_token_id else IGNORE_INDEX for clean, noisy_id in zip(input_ids, noisy)]
        if len(noisy) != len(input_ids) or len(labels) != len(input_ids):
            raise SkipRow("noisy_input_ids or labels differ in length from input_ids")
        if all(label == IGNORE_INDEX for label in labels[prompt_length:]):
            # Kept (a batch of them is a valid, empty micro-batch) but counted: the trainer refuses a train split
            # where every document is like this, which would train at loss 0 without a word.
            self._note = UNSUPERVISED
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

    def _messages(self, messages: list) -> list[dict]:
        """Checked copies: role a string, content a string (text parts joined)."""
        checked = []
        for message in messages:
            # Dataset.from_list / Arrow give every message all keys of the column's struct, a missing one as None.
            if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
                raise SkipRow("a message lacks the role or content key")
            if not isinstance(message["role"], str):
                raise SkipRow("a message's role is not a string")
            content = _content_text(message["content"])
            found = self.control_text.search(content) if self.control_text else None
            if found:
                # The template would read them as real turn boundaries / EOS: the row would not mean what it says.
                raise SkipRow(f"control-token text {found.group()} inside a message's content (it would be read as "
                              "a control token; remove it or pre-tokenize the row)")
            checked.append({**message, "content": content})
        return checked

    def _plain(self, text: str) -> str:
        found = self.control_text.search(text) if self.control_text else None
        if found and not self._note:
            self._note = f"control-token text ({found.group()}) in a plain string, tokenized as a control token"
        return text

    def _check_vocabulary(self, document: dict) -> None:
        """Every id of the document can be embedded by the model and decoded by the tokenizer."""
        for name in ("input_ids", "noisy_input_ids", "labels"):
            ids = [i for i in document.get(name) or [] if not (name == "labels" and i == IGNORE_INDEX)]
            if not ids:
                continue
            low, high = min(ids), max(ids)
            if low < 0:
                raise SkipRow(f"negative token id in {name}")
            if self.model_vocab_size is not None and high >= self.model_vocab_size:
                raise SkipRow(f"token id outside the model's vocabulary (vocab_size {self.model_vocab_size}) "
                              f"in {name}")
            if self.tokenizer_vocab_size is not None and high >= self.tokenizer_vocab_size:
                raise SkipRow(f"token id outside the tokenizer's vocabulary (size {self.tokenizer_vocab_size}) in "
                              f"{name}: pre-tokenized with another tokenizer?")

    def _document(self, prompt_ids: list[int], response_ids: list[int],
                  response_mask: list[int] | None = None) -> dict:
        """response_mask: 1 per supervised response token (multi-turn chats); None = the whole response."""
        if self.mask_token_id in prompt_ids or self.mask_token_id in response_ids:
            raise SkipRow(f"the mask token (id {self.mask_token_id}) appears inside the data")
        if len(prompt_ids) >= self.max_seq_len:
            raise SkipRow(f"prompt longer than max_seq_len ({self.max_seq_len}) leaves no room for a response")
        response_mask = [1] * len(response_ids) if response_mask is None else list(response_mask)
        if not response_ids or response_ids[-1] != self.eos_token_id:
            response_ids, response_mask = response_ids + [self.eos_token_id], response_mask + [1]
        input_ids = prompt_ids + response_ids
        assistant_masks = [0] * len(prompt_ids) + response_mask
        truncated = False
        if len(input_ids) > self.max_seq_len:
            if self.overlong_policy == "skip":
                raise SkipRow(f"document longer than max_seq_len ({self.max_seq_len})")
            input_ids, assistant_masks = input_ids[: self.max_seq_len], assistant_masks[: self.max_seq_len]
            truncated = True
        fill = -len(input_ids) % self.block_size
        input_ids = input_ids + [self.eos_token_id] * fill
        assistant_masks = assistant_masks + assistant_masks[-1:] * fill  # the fill continues the last turn
        if not any(assistant_masks):
            raise SkipRow(f"no assistant token within max_seq_len ({self.max_seq_len})")
        # The mask is kept even for a single span (Arrow needs a typed column from the first rows on); such a
        # mask is the default one and gives the single-turn noise exactly.
        return {"input_ids": input_ids, "prompt_length": len(prompt_ids), "truncated": truncated,
                "assistant_masks": assistant_masks, "multi_turn": not all(assistant_masks[len(prompt_ids):])}


def _given_assistant_masks(row: dict, prompt_length: int) -> list[int] | None:
    """A pre-tokenized row's own `assistant_masks` (TRL's `return_assistant_tokens_mask` output), over the response."""
    masks = row.get("assistant_masks")
    if masks is None or len(masks) == 0:
        return None
    masks = _integers(masks, "assistant_masks")
    if len(masks) != len(row["input_ids"]) or any(m not in (0, 1) for m in masks):
        raise SkipRow("assistant_masks is not one 0/1 value per input_ids token")
    if any(masks[:prompt_length]):
        raise SkipRow("assistant_masks marks a prompt token (before prompt_length)")
    return masks[prompt_length:]


def _sharegpt_messages(conversations) -> list:
    if not isinstance(conversations, list) or not conversations:
        raise SkipRow("conversations is not a non-empty list")
    copies = [dict(message) if isinstance(message, dict) else message for message in conversations]
    messages = maybe_convert_to_chatml({"conversations": copies})["messages"]
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("role"), str):
            message["role"] = SHAREGPT_ROLES.get(message["role"], message["role"])
    return messages


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
               for part in content):
            return "".join(part["text"] for part in content)
        raise SkipRow("a message's content has a part that is not text ({'type': 'text', 'text': ...})")
    raise SkipRow("a message's content is not a string or a list of text parts")


def _integers(values, name: str) -> list[int]:
    """Token ids as ints; integral floats pass (datasets infers a float column from a few rows)."""
    if not isinstance(values, (list, tuple)):
        raise SkipRow(f"{name} is not a list of token ids")
    out = []
    for value in values:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SkipRow(f"{name} holds a value that is not an integer token id")
        out.append(value)
    return out


def _require_text(value, name: str) -> str:
    if value is None:
        raise SkipRow(f"missing {name}")
    if not isinstance(value, str) or not value.strip():
        raise SkipRow(f"empty {name}")
    return value


def is_prepared(dataset: Dataset) -> bool:
    return {"input_ids", "prompt_length", "sample_index", "num_tokens"} <= set(dataset.column_names)


def prepare_dataset(dataset: Dataset, tokenizer, *, block_size: int, max_seq_len: int, mask_token_id: int,
                    overlong_policy: str = "skip", num_proc: int | None = None, split: str = "train",
                    model_vocab_size: int | None = None, supervise_turns: str = "all") -> tuple[Dataset, DataReport]:
    """Tokenize and build documents; returns the kept documents and the report of what was dropped.

    `model_vocab_size`: rows with ids the model cannot embed are skipped (the embedding would fail mid-run).
    `supervise_turns`: "all" assistant turns of a multi-turn chat, or the "last" one (module docstring)."""
    if is_prepared(dataset):
        return dataset, DataReport(split, len(dataset), len(dataset))
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty; pass a dataset with at least one row.")
    if block_size <= 0 or max_seq_len % block_size:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be a multiple of block_size ({block_size}).")
    if supervise_turns not in SUPERVISE_TURNS:
        raise ValueError(f"supervise_turns ({supervise_turns!r}) must be one of {SUPERVISE_TURNS}: 'all' supervises "
                         "every assistant turn of a multi-turn chat, 'last' only the last one.")
    row_format = detect_format(dataset.column_names)
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token (responses end with EOS).")
    builder = DocumentBuilder(tokenizer, block_size, max_seq_len, mask_token_id, eos_token_id, overlong_policy,
                              row_format, model_vocab_size=model_vocab_size, tokenizer_vocab_size=len(tokenizer),
                              supervise_turns=supervise_turns)
    keep = [c for c in ("answer",) if c in dataset.column_names]
    drop = [c for c in dataset.column_names if c not in keep]
    built = dataset.map(builder, with_indices=True, remove_columns=drop, num_proc=num_proc,
                        desc=f"Building {split} documents")
    reasons = built["skip_reason"]
    report = DataReport(split, num_rows=len(dataset))
    for row, (reason, note) in enumerate(zip(reasons, built["note"])):
        if reason:
            report.skipped[reason] += 1
            report.first_row_of.setdefault(reason, row)
        elif note:
            report.noted[note] += 1
            report.first_row_of_note.setdefault(note, row)
    kept = built.filter(lambda reason: not reason, input_columns="skip_reason")
    report.num_documents = len(kept)
    report.num_truncated = sum(kept["truncated"])
    if report.num_documents == 0:
        raise ValueError(f"No usable rows in the {split} dataset.\n{report.summary()}")
    extra = ["skip_reason", "truncated", "note", "multi_turn"]
    if not any(kept["multi_turn"]):  # no multi-turn document: the single-turn columns, exactly
        extra.append("assistant_masks")
    if row_format != "pre-tokenized" or "noisy_input_ids" not in dataset.column_names:
        extra += ["noisy_input_ids", "labels"]
    return kept.remove_columns(extra), report


def save_report(reports: list[DataReport], path) -> None:
    with open(path, "w") as handle:
        json.dump([report.to_dict() for report in reports], handle, indent=2)
