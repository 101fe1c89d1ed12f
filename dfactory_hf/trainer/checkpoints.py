"""Training checkpoints that survive a kill: complete-or-ignored, and resume that picks the newest complete one.

Trainer writes `checkpoint-N/` piece by piece (model or DCP shards, optimizer, scheduler, RNG, trainer state); a
kill in the middle leaves a directory that looks like a checkpoint but is not one. After every rank has finished
writing, rank 0 adds `checkpoint_complete.json` (written to a temporary name and renamed, so the marker itself
is atomic); only marked directories are resumed from, and older checkpoints are rotated out only after the new
one is marked, so a kill during a save never costs the previous checkpoint. `from_pretrained` of an unmarked
`checkpoint-N/` is refused too (models/llada2_moe/validation.py).

Each checkpoint also holds `model_shapes.json` (every tensor's name and shape of the model that wrote it), so a
resume into another model is refused before any step with the tensors that differ. A save that fails because the
disk is full removes the partial directory and says so (`save_failure_message`); the previous checkpoint stays.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

from ..models.llada2_moe.validation import COMPLETE_MARKER
MODEL_SHAPES = "model_shapes.json"
# Below this much free space after a failed write, the failure is the disk being full: torch.save reports ENOSPC as
# "unexpected pos ..." and safetensors as a SafetensorError, neither an OSError.
_NEARLY_FULL_BYTES = 16 * 2**20
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "StorageFull")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
LAST = ("last", "true", "True")


def unmark(checkpoint_dir: str) -> None:
    """Before (re)writing or deleting a checkpoint: it stops counting first."""
    path = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    if os.path.exists(path):
        os.remove(path)


def rotate(run_dir: str, *, save_total_limit: int | None, best_model_checkpoint: str | None) -> None:
    """transformers' `rotate_checkpoints` (same choice of what to delete), unmarking each checkpoint before its
    `rmtree`, so a kill during the deletion never leaves a marked, half-deleted directory."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(run_dir, use_mtime=True)
    protected = {checkpoints[-1]} if checkpoints else set()
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if checkpoint not in protected:
            unmark(checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
            remaining -= 1


def mark_complete(checkpoint_dir: str, *, global_step: int, layout: dict) -> None:
    path = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    with open(path + ".tmp", "w") as f:
        json.dump({"global_step": global_step, **layout}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_marker(checkpoint_dir: str) -> dict | None:
    path = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def newest_complete_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and read_marker(os.path.join(output_dir, name)) is not None:
            steps.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def model_shapes(model) -> dict[str, list[int]]:
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}


def write_model_shapes(checkpoint_dir: str, shapes: dict[str, list[int]]) -> None:
    with open(os.path.join(checkpoint_dir, MODEL_SHAPES), "w") as f:
        json.dump(shapes, f)


def check_model_shapes(checkpoint_dir: str, shapes: dict[str, list[int]] | None) -> None:
    """Refuse a checkpoint written by another model (checkpoints without `model_shapes.json` are not checked)."""
    path = os.path.join(checkpoint_dir, MODEL_SHAPES)
    if shapes is None or not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    problems = [f"{name}: checkpoint {saved[name]}, model {shapes[name]}"
                for name in sorted(saved.keys() & shapes.keys()) if saved[name] != shapes[name]]
    problems += [f"{name}: only in the checkpoint" for name in sorted(saved.keys() - shapes.keys())]
    problems += [f"{name}: only in the model" for name in sorted(shapes.keys() - saved.keys())]
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ValueError(f"--resume_from_checkpoint ({checkpoint_dir}) was written by another model "
                         f"({len(problems)} tensors differ); resume with the model (and --model_config_overrides, "
                         "--use_peft) it was trained with, or start fresh without --resume_from_checkpoint:\n  "
                         + "\n  ".join(shown))


def is_disk_full(error: BaseException, directory: str) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free < _NEARLY_FULL_BYTES


def save_failure_message(checkpoint_dir: str, previous: str | None) -> str:
    existing = Path(checkpoint_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    free_mib = shutil.disk_usage(existing).free / 2**20
    kept = (f"the previous complete checkpoint ({previous}) is intact" if previous
            else "there is no earlier complete checkpoint")
    return (f"Disk full while writing checkpoint {checkpoint_dir} ({free_mib:.0f} MiB free there): the partial "
            f"checkpoint was removed and {kept}. Free space, lower --save_total_limit or point --output_dir at a "
            "larger disk, then rerun with --resume_from_checkpoint last.")


def check_resume_path(path: str) -> None:
    """A `--resume_from_checkpoint` path must be a complete checkpoint directory (checked at argument parsing too,
    before any data work)."""
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint ({path}) is not a directory; pass a checkpoint-N directory "
                         "or `last`.")
    if not os.listdir(path):
        raise ValueError(f"--resume_from_checkpoint ({path}) is an empty directory; pass a checkpoint-N directory "
                         "written by DiffusionTrainer, or `last`.")
    if read_marker(path) is not None:
        return
    inside = newest_complete_checkpoint(path)
    if inside is not None:
        raise ValueError(f"--resume_from_checkpoint ({path}) is a run directory, not a checkpoint; pass one of its "
                         f"checkpoints (the newest complete one is {inside}), or `last` with --output_dir {path}.")
    newest = newest_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
    fix = (f"resume from the newest complete one ({newest}) or pass `last`" if newest is not None else
           "there is no complete checkpoint next to it; pass a checkpoint-N directory written by DiffusionTrainer")
    raise ValueError(f"--resume_from_checkpoint ({path}) is incomplete (no {COMPLETE_MARKER}: its save was "
                     f"interrupted, or it was not written by DiffusionTrainer); {fix}.")


def resolve_resume_checkpoint(value: str | bool | None, *, output_dir: str, layout: dict,
                              shapes: dict[str, list[int]] | None = None) -> str | None:
    """`--resume_from_checkpoint` -> a complete checkpoint directory (or None: start fresh).

    `last` (or True) takes the newest complete checkpoint in `output_dir`; a path must be a complete checkpoint.
    Resuming with a different data-parallel size is refused: the sampler's plan of which documents each replica
    trains on depends on it, so the resumed run could not continue the interrupted one exactly.
    """
    if value is None or value is False:
        return None
    if value is True or value in LAST:
        found = newest_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint (a checkpoint-N directory "
                             f"with {COMPLETE_MARKER}) in {output_dir}; train without it to start fresh.")
        path = found
    else:
        path = str(value)
        check_resume_path(path)
    marker = read_marker(path)
    if marker.get("dp_size") != layout["dp_size"]:
        raise ValueError(
            f"--resume_from_checkpoint ({path}) was written with {marker.get('dp_size')} data-parallel replicas "
            f"(world size {marker.get('world_size')}), this run has {layout['dp_size']} (world size "
            f"{layout['world_size']}); resuming with a different data-parallel size is refused because the "
            f"documents of each remaining step would differ. Launch with --num_processes "
            f"{marker.get('world_size')} and the same parallel sizes.")
    if bool(marker.get("fsdp")) != bool(layout.get("fsdp")):
        kinds = {True: "FSDP2 (sharded DCP files)", False: "without FSDP"}
        raise ValueError(f"--resume_from_checkpoint ({path}) was written {kinds[bool(marker.get('fsdp'))]}, this run "
                         f"is {kinds[bool(layout.get('fsdp'))]}; resume with the launch config it was trained with.")
    check_model_shapes(path, shapes)
    return path
