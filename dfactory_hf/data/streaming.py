"""Streaming (`datasets.IterableDataset`) training data: documents built lazily, micro-batched by token budget
from a bounded look-ahead buffer, with an exact resume of the data position.

    stream = load_dataset("json", data_files="train.jsonl", split="train", streaming=True)
    DiffusionTrainer(model, args, train_dataset=stream, ...)   # needs --max_steps and a token budget

A map-style dataset is planned from the lengths of all its rows (sampler.py). A stream has no length, so:

1. rows become documents as they are read: this data-parallel replica keeps every dp_size-th row (`filter` by the
   row's position; the position is the document's `sample_index`, its noise seed, whatever the layout), then
   `DocumentBuilder` (the same per-row checks as `prepare_dataset`) in `IterableDataset.map`. Skipped rows are
   counted into the split's `DataReport` as they are met (a `filter` would drop them unseen);
2. `buffer_size` documents at a time (`--dynamic_batching_buffer_size`) are planned by the map-style planner,
   `TokenBudgetBatchSampler` over the buffer's lengths (the same best-fit packing, rows of max_seq_len with
   packing, micro-batches of at most the budget, a multiple of `micro_batches_per_step` by splitting; a last buffer
   too small for one step is dropped). Each replica plans its own share, so every replica yields
   `micro_batches_per_step` micro-batches per optimizer step; before each step the replicas agree (`all_ready`, a
   collective) that every one of them holds a whole step, and the pass ends on all of them at the first one's end,
   so no rank waits in a collective the others never reach. The next pass starts the stream over (`epoch` + 1,
   the second noise seed);
3. the data position is that of the next micro-batch the model takes: the stream's `state_dict()` at the start of
   its buffer (datasets' own resumable state, >= 2.18), the rows read before it, the micro-batches of the buffer
   already taken and the report's counts at the buffer start. A resume reloads that state, refills the same buffer
   (deterministically), plans it again and skips what was taken: the run continues exactly (the DataLoader runs in
   the main process, so what it yielded is what the model took). A stream shuffled by datasets' own shuffle
   buffer loses the buffer's content on resume (datasets' rule): shuffle the files, or pre-shuffle.

The fill ratio follows the buffer as in sampler.py (0.98 with 512 documents of a 8192-token budget for median
256-token documents); the buffer holds `buffer_size` documents in memory.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator

import torch
from datasets import IterableDataset

from .preprocessing import SUPERVISE_TURNS, DataReport, DocumentBuilder, detect_format
from .sampler import TokenBudgetBatchSampler

logger = logging.getLogger(__name__)


def stream_columns(stream: IterableDataset) -> list[str]:
    """The stream's column names, read from its first row when datasets does not know them up front."""
    if stream.column_names is not None:
        return list(stream.column_names)
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise ValueError("The streaming train dataset yields no row; pass a stream with at least one row.")
    return list(first)


def prepare_stream(stream: IterableDataset, tokenizer, *, block_size: int, max_seq_len: int, mask_token_id: int,
                   overlong_policy: str = "skip", model_vocab_size: int | None = None, supervise_turns: str = "all",
                   data_parallel_rank: int = 0, data_parallel_size: int = 1, split: str = "train"
                   ) -> tuple[IterableDataset, DataReport, list[str]]:
    """This replica's rows of `stream` as lazily built documents (with their `skip_reason`), the report they are
    counted into while training reads them, and the stream's columns."""
    if block_size <= 0 or max_seq_len % block_size:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be a multiple of block_size ({block_size}).")
    if supervise_turns not in SUPERVISE_TURNS:
        raise ValueError(f"supervise_turns ({supervise_turns!r}) must be one of {SUPERVISE_TURNS}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token; set tokenizer.eos_token (responses end with EOS).")
    columns = stream_columns(stream)
    builder = DocumentBuilder(tokenizer, block_size, max_seq_len, mask_token_id, tokenizer.eos_token_id,
                              overlong_policy, detect_format(columns), model_vocab_size=model_vocab_size,
                              tokenizer_vocab_size=len(tokenizer), supervise_turns=supervise_turns)
    rank, size = data_parallel_rank, data_parallel_size
    if size > 1:
        stream = stream.filter(lambda _, position: position % size == rank, with_indices=True)
    # The k-th row this replica keeps is row k * size + rank of the stream.
    documents = stream.map(lambda row, k: builder(row, k * size + rank), with_indices=True,
                           remove_columns=[c for c in columns if c != "answer"])
    return documents, DataReport(split), columns


class StreamingBatches(torch.utils.data.IterableDataset):
    """This replica's micro-batches (lists of document features, each with its `epoch` and planned `row`) of a
    stream of documents (`prepare_stream`), planned `buffer_size` documents at a time; `state_dict()` is the
    position of the next micro-batch, `load_state_dict` makes the next iteration start there."""

    def __init__(self, documents: IterableDataset, report: DataReport, *, max_tokens_per_micro_batch: int,
                 buffer_size: int, micro_batches_per_step: int, copies: int = 1, padded: bool = False,
                 row_length: int | None = None, all_ready: Callable[[bool], bool] | None = None):
        self.documents = documents
        self.report = report
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.buffer_size = buffer_size
        self.micro_batches_per_step = micro_batches_per_step
        self.copies = copies  # complementary masking: a document is planned at twice its length
        self.padded = padded
        self.row_length = row_length
        self.all_ready = all_ready or (lambda ready: ready)  # every replica holds a whole step (a collective)
        self._start_state = copy.deepcopy(documents.state_dict())  # the stream's beginning
        self._position = self._buffer_start(epoch=0, stream_state=self._start_state, report=report)
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        return copy.deepcopy(self._position)

    def load_state_dict(self, state: dict) -> None:
        saved, planned = state.get("plan", {}), self._plan_settings()
        if saved != planned:
            changed = ", ".join(f"{key} {saved.get(key)} -> {value}" for key, value in planned.items()
                                if saved.get(key) != value)
            raise ValueError(f"The saved stream position was planned with other settings ({changed}): the buffer "
                             "would be planned anew and the run would not continue as it was; resume with the "
                             "settings of the saved run, or pass --ignore_data_skip to start the stream over.")
        self._resume = copy.deepcopy(state)
        self._position = copy.deepcopy(state)

    def __iter__(self) -> Iterator[list[dict]]:
        # The passes end to end (Trainer stops at max_steps): a resume at the very end of a pass goes on into the
        # next one instead of ending Trainer's epoch with no batch, which Trainer takes for the end of the data.
        state, self._resume = self._resume, None
        resumed = state is not None
        if state is None:
            state = self._buffer_start(epoch=0, stream_state=self._start_state, report=self.report)
        while True:
            num_yielded = yield from self._pass(state)
            if num_yielded == 0 and not resumed:  # not one optimizer step in the whole stream
                logger.warning("the stream holds less than one optimizer step of documents")
                return
            resumed = False
            state = self._buffer_start(epoch=state["epoch"] + 1, stream_state=self._start_state, report=self.report)

    def _pass(self, state: dict):
        """One pass over the stream from the position `state`; returns the number of micro-batches yielded."""
        self._restore_report(state["report"])
        self.documents.load_state_dict(copy.deepcopy(state["stream_state"]))
        rows = iter(self.documents)
        epoch, skip, num_yielded = state["epoch"], state["num_micro_batches_taken"], 0
        pending: list[tuple[dict, list[dict]]] = []  # (position at its buffer's start, micro-batch), in order
        exhausted, first = False, True
        while True:
            while len(pending) < self.micro_batches_per_step and not exhausted:
                # Until the stream's iterator has run, its state_dict() is still that of the last one: the first
                # buffer starts where `state` says.
                stream_state = state["stream_state"] if first else self.documents.state_dict()
                start = self._buffer_start(epoch=epoch, stream_state=stream_state, report=self.report)
                first = False
                buffer, exhausted = self._fill(rows, count=epoch == 0)
                pending += [(start, batch) for batch in self._plan(buffer, epoch)[skip:]]
                start["num_micro_batches_taken"] = skip  # of this buffer, before the first yield here
                skip = 0
            # Every replica holds a whole step, or the pass ends on all of them (a collective: no rank left waiting).
            if not self.all_ready(len(pending) >= self.micro_batches_per_step):
                return num_yielded
            for _ in range(self.micro_batches_per_step):
                start, batch = pending.pop(0)
                start["num_micro_batches_taken"] += 1
                self._position = copy.deepcopy(start)
                num_yielded += 1
                yield batch

    # ---- pieces ----
    def _buffer_start(self, *, epoch: int, stream_state: dict, report: DataReport) -> dict:
        return {"epoch": epoch, "stream_state": copy.deepcopy(stream_state), "num_micro_batches_taken": 0,
                "report": report.to_dict(), "plan": self._plan_settings()}

    def _plan_settings(self) -> dict:
        """What the micro-batches of a buffer depend on besides its documents."""
        return {"max_tokens_per_micro_batch": self.max_tokens_per_micro_batch, "buffer_size": self.buffer_size,
                "micro_batches_per_step": self.micro_batches_per_step, "copies": self.copies, "padded": self.padded,
                "row_length": self.row_length}

    def _restore_report(self, saved: dict) -> None:
        report = self.report
        report.num_rows, report.num_documents, report.num_truncated = (saved["num_rows"], saved["num_documents"],
                                                                       saved["num_truncated"])
        report.skipped.clear()
        report.skipped.update(saved["skipped"])
        report.first_row_of = dict(saved["first_row_of"])
        report.noted.clear()
        report.noted.update(saved["noted"])
        report.first_row_of_note = dict(saved["first_row_of_note"])

    def _fill(self, rows: Iterator[dict], *, count: bool) -> tuple[list[dict], bool]:
        """Up to `buffer_size` documents from the stream; True when the stream ended. With `count` (the first pass)
        the rows go into the report, skipped ones with their reason."""
        buffer, report = [], self.report if count else DataReport(self.report.split)
        for row in rows:
            report.num_rows += 1
            position = row["sample_index"]
            if row["skip_reason"]:
                report.skipped[row["skip_reason"]] += 1
                report.first_row_of.setdefault(row["skip_reason"], position)
                continue
            if row["note"]:
                report.noted[row["note"]] += 1
                report.first_row_of_note.setdefault(row["note"], position)
            report.num_documents += 1
            report.num_truncated += int(row["truncated"])
            buffer.append({key: value for key, value in row.items()
                           if key not in ("skip_reason", "note", "truncated", "multi_turn")})
            if len(buffer) == self.buffer_size:
                return buffer, False
        return buffer, True

    def _plan(self, buffer: list[dict], epoch: int) -> list[list[dict]]:
        """The buffer's micro-batches, by the map-style planner (a multiple of micro_batches_per_step)."""
        if len(buffer) < self.micro_batches_per_step:
            if buffer:
                logger.warning("the stream's last %d documents make less than one optimizer step; dropped",
                               len(buffer))
            return []
        planner = TokenBudgetBatchSampler(
            lengths=[feature["num_tokens"] * self.copies for feature in buffer],
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch, data_parallel_rank=0, data_parallel_size=1,
            seed=0, buffer_size=len(buffer), shuffle=False,  # the stream's order
            micro_batches_per_step=self.micro_batches_per_step,
            padded=self.padded, row_length=self.row_length, drop_last=True)
        batches = []
        for keys in planner:
            batch = []
            for key in keys:
                feature = {**buffer[int(key)], "epoch": epoch}
                if key.row is not None:
                    feature["row"] = key.row
                batch.append(feature)
            batches.append(batch)
        return batches
