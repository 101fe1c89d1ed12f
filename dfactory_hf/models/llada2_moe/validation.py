"""Checks a checkpoint directory passes before `from_pretrained` reads it.

transformers re-initialises any tensor missing from a checkpoint (with a log line most users never see) and
training then goes on from random attention or router weights. These checks read the safetensors headers only
(no tensor data) and refuse, naming the key and both shapes:

- a training checkpoint (`checkpoint-N/`) without the completeness marker: its save was interrupted;
- a safetensors file that is truncated or unreadable, or an index naming a shard that is not there;
- a missing or mis-shaped tensor, experts (conversion.validate_expert_tensors) and every other one alike;
  tensors the model has no place for are reported (a warning: from_pretrained ignores them).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from .conversion import _EXPERT_KEY, checkpoint_shapes, validate_expert_tensors

logger = logging.getLogger(__name__)

# Written by DiffusionTrainer into each training checkpoint once every rank has finished it (trainer/checkpoints.py).
COMPLETE_MARKER = "checkpoint_complete.json"
_TRAINING_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def refuse_incomplete_training_checkpoint(directory: Path) -> None:
    """A `checkpoint-N/` counts once it has the marker. Without one it is refused when it cannot be complete: no
    `trainer_state.json` (Trainer writes it after the weights), or written by DiffusionTrainer (a sibling has the
    marker). A plain Trainer's complete checkpoint (never marked) still loads."""
    if not _TRAINING_CHECKPOINT.match(directory.name) or (directory / COMPLETE_MARKER).exists():
        return
    ours = any((sibling / COMPLETE_MARKER).exists() for sibling in directory.parent.glob("checkpoint-*"))
    if ours or not (directory / "trainer_state.json").exists():
        raise ValueError(f"{directory} is an incomplete training checkpoint (no {COMPLETE_MARKER}: its save was "
                         "interrupted); load an earlier complete checkpoint-N, or the final model in the run's "
                         "output_dir.")


def readable_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """`checkpoint_shapes`, with a truncated file or a missing shard named instead of a safetensors error."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as error:
            raise ValueError(f"{index} is not a safetensors index (no weight_map); save the checkpoint again."
                             ) from error
        missing = sorted(name for name in names if not (directory / name).is_file())
        if missing:
            raise ValueError(f"{directory}: the safetensors index names a shard that is missing ({missing[0]}"
                             f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); the save was "
                             "interrupted or a file was not copied. Copy the missing shards or save again.")
    try:
        return checkpoint_shapes(directory)
    except FileNotFoundError as error:
        raise ValueError(f"{directory}: the safetensors index names a shard that is missing ({error.filename}); the "
                         "save was interrupted or a file was not copied. Copy the missing shard or save again."
                         ) from error
    except Exception as error:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{directory}: a safetensors file is truncated or not a safetensors file ({error}); the "
                         "save was interrupted or the download is incomplete. Save or download it again.") from error


def validate_checkpoint_tensors(shapes: dict[str, tuple[int, ...]], config, model_class, source: str) -> None:
    """Every tensor the model expects is in the checkpoint with its shape; extras are reported."""
    validate_expert_tensors(shapes, config, source=source)
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in model_class(config).state_dict().items()
                    if not _EXPERT_KEY.match(key)}
    if getattr(config, "tie_word_embeddings", False):
        for tied in getattr(model_class, "_tied_weights_keys", None) or {}:
            expected.pop(tied, None)
    found = {key: shape for key, shape in shapes.items() if not _EXPERT_KEY.match(key)}
    prefix = getattr(model_class, "base_model_prefix", "") + "."
    if prefix != "." and not any(key.startswith(prefix) for key in expected):
        # A base model read from a causal-LM checkpoint: its keys carry the prefix; the head is not ours.
        found = {key[len(prefix):]: shape for key, shape in found.items() if key.startswith(prefix)}
    problems = [f"missing tensor {key} (expected shape {shape})" for key, shape in expected.items() if key not in found]
    problems += [f"{key}: expected shape {shape}, found {tuple(found[key])}" for key, shape in expected.items()
                 if key in found and tuple(found[key]) != shape]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError(f"Tensors of {source} do not match the config (a tensor left out would be silently "
                         "re-initialised); use the config the checkpoint was saved with, or a complete "
                         "checkpoint:\n  " + "\n  ".join(shown))
    extra = sorted(set(found) - set(expected))
    if extra:
        logger.warning("%s holds %d tensors the model has no place for (ignored): %s", source, len(extra),
                       ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
