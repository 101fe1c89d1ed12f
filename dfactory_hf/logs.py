"""One log level for transformers' loggers and ours, from `--log_level` / `--log_level_replica`.

Trainer applies `TrainingArguments.get_process_log_level()` to transformers' loggers in its `__init__`, after
the model is loaded, and `set_verbosity` reaches only the `transformers` logger tree. `apply_log_level` sets
the same level on both trees (`dfactory_hf.*` modules log through `logging.getLogger(__name__)`); the entry
points call it right after parsing, so loading follows it too, and DiffusionTrainer calls it again (a script
that builds the trainer itself). Reports meant to be read (data reports, the results table) stay printed, by
the main process only. `TensorBoardInOutputDir`: `--report_to tensorboard` writes under output_dir also when an
evaluation comes before training.
"""

from __future__ import annotations

import logging
import os
import sys

from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import default_logdir
from transformers.utils import logging as hf_logging

LIBRARY_LOGGER = "dfactory_hf"


def apply_log_level(args) -> int:
    """Set this process's level (`args.get_process_log_level()`) on transformers' loggers and ours."""
    level = args.get_process_log_level()
    hf_logging.set_verbosity(level)
    library = logging.getLogger(LIBRARY_LOGGER)
    library.setLevel(level)
    if not library.handlers and not logging.getLogger().handlers:
        # As transformers does for its own tree: a stderr handler, so INFO shows when asked for (Python's
        # last-resort handler prints WARNING and above only); not when the root logger has handlers (a user's
        # logging config, pytest's capture), which print our records already: they still propagate.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        library.addHandler(handler)
    return level



class TensorBoardInOutputDir(TensorBoardCallback):
    """transformers 5.23's TensorBoardCallback picks its folder in on_train_begin; a log before that (an
    evaluate() before train(), as examples/sft_llada2.py does) opens a writer on `./runs` in the working
    directory, and the whole run's training scalars land there instead of `output_dir/runs/`."""

    def __init__(self, original: TensorBoardCallback):
        super().__init__(tb_writer=original.tb_writer)
        self.logging_dir = original.logging_dir  # TENSORBOARD_LOGGING_DIR, when set

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tb_writer is None and self.logging_dir is None:
            self.logging_dir = os.path.join(args.output_dir, default_logdir())
        return super().on_log(args, state, control, logs=logs, **kwargs)


def keep_tensorboard_in_output_dir(trainer) -> None:
    """Swap Trainer's TensorBoardCallback (`--report_to tensorboard`) for `TensorBoardInOutputDir`."""
    callback = trainer.callback_handler.pop_callback(TensorBoardCallback)
    if callback is not None:
        trainer.add_callback(TensorBoardInOutputDir(callback))
