"""`--profile_steps a-b`: a torch.profiler trace of optimizer steps a..b, written as a Chrome trace.

Steps count from 0 the way Trainer's `global_step` does before a step runs: `--profile_steps 0-0` is the first
optimizer step of the run, `10-12` the three steps after the first ten (a resumed run counts on from its
checkpoint). The profiler starts at the first micro-batch of step a and stops after the optimizer update of
step b; each step is labelled `optimizer_step_<n>` in the trace. Every rank writes its own file,
`<output_dir>/profile/trace_steps_<a>-<b>_rank<r>.json`, readable in chrome://tracing or https://ui.perfetto.dev.
CPU activity always, CUDA kernels when a GPU is in use. Profiling slows the steps it covers: keep the range short.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
    """`"a-b"` (0 <= a <= b) -> (a, b); None stays None."""
    if value is None or value == "":
        return None
    match = _RANGE.match(str(value).strip())
    if not match or int(match[1]) > int(match[2]):
        raise ValueError(f"--profile_steps ({value!r}) must be 'a-b' with 0 <= a <= b, optimizer steps counted from "
                         "0 (e.g. 10-12 profiles three steps after the first ten; 0-0 the first step).")
    return int(match[1]), int(match[2])


def trace_path(output_dir: str, first: int, last: int, rank: int) -> str:
    return os.path.join(output_dir, "profile", f"trace_steps_{first}-{last}_rank{rank}.json")


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps [first, last] (inclusive) of the run and export one Chrome trace per rank."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.profiler: torch.profiler.profile | None = None
        self.step_label = None
        self.path: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and self.last >= state.max_steps:
            raise ValueError(f"--profile_steps ({self.first}-{self.last}) reaches past the run's last optimizer step "
                             f"({state.max_steps - 1}, counted from 0); use a range within 0-{state.max_steps - 1}.")

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if not self.first <= step <= self.last:
            return
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
        self.step_label = torch.profiler.record_function(f"optimizer_step_{step}")
        self.step_label.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            return
        self.step_label.__exit__(None, None, None)
        self.step_label = None
        if state.global_step - 1 >= self.last:  # global_step already counts the step that just ended
            self._export(args, state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:  # the run ended inside the range (interrupted, or fewer steps than planned)
            if self.step_label is not None:
                self.step_label.__exit__(None, None, None)
            self._export(args, state.global_step - 1)

    def _export(self, args, last_step: int) -> None:
        self.profiler.stop()
        self.path = trace_path(args.output_dir, self.first, last_step, args.process_index)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.profiler.export_chrome_trace(self.path)
        self.profiler = None
        logger.info("profile of optimizer steps %d-%d written to %s", self.first, last_step, self.path)
