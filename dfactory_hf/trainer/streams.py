"""A streaming train dataset (`datasets.IterableDataset`) in `DiffusionTrainer`: the checks, the dataloader and the
data position saved with each checkpoint (data/streaming.py does the batching).

Each process writes `stream_state/process-<index>.json` into the checkpoint (its replica's position in the stream);
a resume from that checkpoint reads it back, so the run continues with the next micro-batch the uninterrupted run
would have taken. Trainer's own resume replays (`skip_first_batches`) the micro-batches of the resumed "epoch";
for a stream that would read, tokenize and noise the whole stream again, so the trainer turns that replay off
(`ignore_data_skip`) while the stream restores its own position. A user's `--ignore_data_skip` keeps its meaning:
the stream then starts from its beginning.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from datasets import IterableDataset

from ..data.streaming import StreamingBatches, prepare_stream

STATE_FOLDER = "stream_state"


def is_stream(dataset) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset) and not isinstance(dataset, IterableDataset):
        raise ValueError(f"The dataset is a torch IterableDataset ({type(dataset).__name__}); a stream must be a "
                         "datasets.IterableDataset (its rows are checked, built and resumed through datasets): wrap "
                         "it with datasets.IterableDataset.from_generator(...), or pass a map-style dataset.")
    return isinstance(dataset, IterableDataset)


def check_stream_args(args, split: str) -> None:
    """Before any data work: what a stream needs that a map-style dataset does not."""
    if split != "train":
        raise ValueError(f"The {split} dataset is a streaming IterableDataset; held-out data must be map-style (its "
                         "batches are counted and split over replicas): pass Dataset.from_list(list(stream.take(N))), "
                         "or a test split loaded without streaming.")
    if args.max_steps <= 0:
        raise ValueError(f"A streaming train dataset has no length, so --max_steps ({args.max_steps}) must be set "
                         "(> 0): training stops there (the stream starts over when it ends first); or load the data "
                         "map-style (streaming: false).")
    if not args.uses_token_budget:
        raise ValueError("A streaming train dataset is batched by token budget from a look-ahead buffer: set "
                         "--max_tokens_per_micro_batch (or --packing / --padding_free).")
    if args.batch_warmup_ratio > 0:
        raise ValueError(f"--batch_warmup_ratio ({args.batch_warmup_ratio}) ramps the budget over the planned steps "
                         "of a map-style dataset; with a streaming train dataset set --batch_warmup_ratio 0.")
    copies = 2 if args.complementary_masking else 1
    if copies * args.max_seq_len > args.token_budget:
        raise ValueError(f"complementary_masking doubles each document, and a stream's document may hold "
                         f"max_seq_len ({args.max_seq_len}) tokens, twice the token budget ({args.token_budget}) "
                         f"at most; raise max_tokens_per_micro_batch to at least {copies * args.max_seq_len}.")


def prepare_train_stream(trainer, dataset: IterableDataset, tokenizer, args):
    """The stream's documents (built lazily), its report, and whether it brings its own noise."""
    documents, report, columns = prepare_stream(
        dataset, tokenizer, block_size=args.block_size, max_seq_len=args.max_seq_len,
        mask_token_id=trainer.mask_token_id, overlong_policy=args.overlong_document_policy,
        model_vocab_size=trainer._model_vocab_size, supervise_turns=args.supervise_turns,
        data_parallel_rank=trainer.parallel_state.dp_rank, data_parallel_size=trainer.parallel_state.dp_size)
    return documents, report, "noisy_input_ids" in columns


def stream_batches(trainer) -> StreamingBatches:
    args, parallel_state = trainer.args, trainer.parallel_state

    def all_ready(ready: bool) -> bool:  # every replica holds a whole optimizer step
        if parallel_state.dp_size == 1:
            return ready
        count = parallel_state.sum_over_data(torch.tensor(float(ready), device=args.device))
        return int(count.item()) == parallel_state.dp_size

    copies = 2 if args.complementary_masking else 1
    return StreamingBatches(
        trainer.train_dataset, trainer._stream_report, max_tokens_per_micro_batch=args.token_budget,
        buffer_size=args.dynamic_batching_buffer_size, micro_batches_per_step=args.gradient_accumulation_steps,
        copies=copies,
        padded=not (args.packing or args.padding_free),
        row_length=args.max_seq_len if args.packing and copies == 1 else None, all_ready=all_ready)


def stream_dataloader(batches: StreamingBatches, collator) -> torch.utils.data.DataLoader:
    # In the main process (what it yielded is what the model took: the saved position is exact), not through
    # accelerate's prepare, whose IterableDataset handling (dispatching from rank 0, or re-sharding the batches)
    # would undo the replica sharding and the budget; Trainer moves each batch to the device.
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=collator, num_workers=0)


def save_stream_state(checkpoint_dir: str, batches: StreamingBatches, process_index: int) -> None:
    folder = os.path.join(checkpoint_dir, STATE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"process-{process_index}.json"), "w") as handle:
        json.dump(batches.state_dict(), handle)


def load_stream_state(checkpoint_dir: str, process_index: int) -> dict:
    path = os.path.join(checkpoint_dir, STATE_FOLDER, f"process-{process_index}.json")
    if not os.path.isfile(path):
        raise ValueError(f"--resume_from_checkpoint ({checkpoint_dir}) has no {STATE_FOLDER}/process-"
                         f"{process_index}.json, the stream position of a streaming run; resume from a checkpoint of "
                         "the streaming run, or pass --ignore_data_skip to start the stream from its beginning.")
    with open(path) as handle:
        return json.load(handle)


@contextlib.contextmanager
def resuming_stream(trainer, checkpoint_dir: str | None):
    """Around Trainer.train: a streaming run resumes from its saved position, and Trainer does not replay it."""
    if not is_stream(trainer.train_dataset) or trainer.args.ignore_data_skip:
        yield
        return
    trainer._stream_resume = (load_stream_state(checkpoint_dir, trainer.args.process_index)
                              if checkpoint_dir is not None else None)
    trainer.args.ignore_data_skip = True
    try:
        yield
    finally:
        trainer.args.ignore_data_skip = False
