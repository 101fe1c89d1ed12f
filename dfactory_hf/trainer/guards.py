"""Run guards: SIGTERM saves a checkpoint and stops (`--save_on_interrupt`), a run that took no step fails, and a
run stops once held-out exact match reaches a target (`--stop_at_exact_match`).

Schedulers (SLURM, Kubernetes) send SIGTERM and kill the job a grace period later. With `--save_on_interrupt`
the handler only records the signal; the current optimizer step finishes, then every rank agrees (one all-reduce
per step, so all ranks save the same step and the collective save cannot deadlock), Trainer saves a complete
checkpoint and stops, and `DiffusionTrainer.train` exits with status 143 (128 + SIGTERM, what a shell reports for
a terminated job). Without the flag SIGTERM keeps its default (the process dies; the last complete checkpoint
stays usable).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from transformers import TrainerCallback

INTERRUPTED_EXIT_STATUS = 128 + signal.SIGTERM


class SaveOnInterrupt(TrainerCallback):
    """SIGTERM -> after the current optimizer step: save a checkpoint and stop training (on every rank alike)."""

    def __init__(self, any_rank: Callable[[bool], bool]):
        self.any_rank = any_rank  # True when the flag is set on any rank (a collective)
        self.received = False
        self.saved_at_step: int | None = None
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.saved_at_step = False, None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_rank(self.received):
            control.should_save = True
            control.should_training_stop = True
            self.saved_at_step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class StepCounter(TrainerCallback):
    """Optimizer steps taken by the current `train()` call."""

    def __init__(self):
        self.steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def no_step_message(trainer) -> str:
    """Why a fresh run took no optimizer step, with the numbers that decide it."""
    args = trainer.args
    dataset = trainer.train_dataset
    documents = 0 if dataset is None else len(dataset) if hasattr(dataset, "__len__") else "streamed"
    return (f"Training ran no optimizer step: {documents} training documents, --per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x --gradient_accumulation_steps {args.gradient_accumulation_steps} "
            f"x {trainer.parallel_state.dp_size} data replicas, --max_steps {args.max_steps}, --num_train_epochs "
            f"{args.num_train_epochs}, --dataloader_drop_last {args.dataloader_drop_last}; nothing was trained or "
            "saved. Give more documents, or lower the batch size or gradient accumulation.")


class StopAtExactMatch(TrainerCallback):
    """Stop at the first evaluation whose `*_exact_match` is >= `target` (every rank sees the same reduced
    metrics, so every rank stops at the same step)."""

    def __init__(self, target: float):
        self.target = target
        self.stopped_at: tuple[int, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        reached = [value for name, value in (metrics or {}).items()
                   if name.endswith("_exact_match") and value >= self.target]
        if reached and state.global_step < state.max_steps:
            self.stopped_at = (state.global_step, reached[0])
            control.should_training_stop = True
