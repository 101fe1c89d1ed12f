"""Pictures as PNG files: training curves, the block-diffusion attention mask, and the commit order of generation.

    dfactory-hf plot OUTPUT_DIR [--out curves.png]              loss, masked-token accuracy, eval curves
    dfactory-hf show-mask --lengths 12 8 --block_size 4          the [x_t ; x_0] mask of one packed row
    dfactory-hf generate --model PATH --prompt "..." --trace trace.png   the step at which each position committed

matplotlib is an optional dependency (`pip install 'dfactory_hf[plot]'`), imported when a picture is drawn, with
the Agg backend (no display needed). Every function writes one PNG of a fixed pixel size (FIGURE_SIZE x DPI) and
returns its path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

DPI = 100
CURVES_SIZE = (13.5, 3.6)  # inches: 1350 x 360 pixels at DPI
MASK_SIZE = (6.0, 6.0)  # 600 x 600
TRACE_ROW_SIZE = (9.0, 3.0)  # 900 x 300 per prompt
MAX_LABELLED_TOKENS = 64  # longer answers get no token labels (unreadable)


class MissingExtraError(ImportError):
    """An optional dependency is not installed; `extra` names the pip extra that brings it."""

    def __init__(self, message: str, *, extra: str):
        super().__init__(message)
        self.extra = extra


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("dfactory_hf's pictures need matplotlib, which is not installed; install the plot extra: "
                          "pip install 'dfactory_hf[plot]' (or pip install matplotlib)", extra="plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    pyplot().close(figure)
    return out


# --- training curves ---------------------------------------------------------------------------------------


def find_trainer_state(run_dir) -> Path:
    """`trainer_state.json` of a run folder (its own, else its latest checkpoint-N's) or of a checkpoint folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"OUTPUT_DIR ({run_dir}) is not a directory; pass a run's --output_dir or one of its "
                         "checkpoint-N folders")
    state = run_dir / "trainer_state.json"
    if state.is_file():
        return state
    checkpoints = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                          and (p / "trainer_state.json").is_file()), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints:
        return checkpoints[-1] / "trainer_state.json"
    raise ValueError(f"no trainer_state.json in {run_dir} nor in a checkpoint-N folder of it; Trainer writes it with "
                     "every checkpoint (--save_strategy steps) and examples/sft_llada2.py at the end of training")


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step = {}  # the last entry of a step wins (a final evaluation repeats the last step's)
    for entry in history:
        if key in entry and "step" in entry:
            by_step[int(entry["step"])] = float(entry[key])
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def plot_training_curves(run_dir, out) -> Path:
    """Train loss and eval loss, train and eval masked-token accuracy, and the eval loss at each fixed mask rate t
    (`eval_mask_rates`) when the run evaluated; from the log history of `trainer_state.json`."""
    state_path = find_trainer_state(run_dir)
    history = json.loads(state_path.read_text()).get("log_history", [])
    curves = {key: _series(history, key) for key in ("loss", "ce_loss", "eval_loss", "masked_token_accuracy",
                                                      "eval_masked_token_accuracy")}
    if not curves["loss"][0]:
        raise ValueError(f"{state_path} logs no training loss; train with --logging_steps smaller than max_steps")
    rate_keys = sorted({k for entry in history for k in entry if re.fullmatch(r"eval_loss_t[0-9.]+", k)},
                       key=lambda k: float(k.removeprefix("eval_loss_t")))

    plt = pyplot()
    panels = 3 if rate_keys else 2
    figure, axes = plt.subplots(1, panels, figsize=CURVES_SIZE, layout="constrained")
    loss_axis, accuracy_axis = axes[0], axes[1]
    loss_axis.plot(*curves["loss"], label="train loss")
    if curves["ce_loss"][0]:
        loss_axis.plot(*curves["ce_loss"], label="train CE per masked token", alpha=0.6)
    if curves["eval_loss"][0]:
        loss_axis.plot(*curves["eval_loss"], "o-", label="eval loss")
    loss_axis.set(title="loss", xlabel="step", yscale="log")
    accuracy_axis.plot(*curves["masked_token_accuracy"], label="train")
    if curves["eval_masked_token_accuracy"][0]:
        accuracy_axis.plot(*curves["eval_masked_token_accuracy"], "o-", label="eval")
    accuracy_axis.set(title="masked-token accuracy", xlabel="step", ylim=(0, 1))
    if rate_keys:
        colours = plt.get_cmap("viridis")
        for index, key in enumerate(rate_keys):
            colour = colours(index / max(len(rate_keys) - 1, 1))
            axes[2].plot(*_series(history, key), "o-", color=colour, label=f"t = {key.removeprefix('eval_loss_t')}")
        axes[2].set(title="eval loss at mask rate t", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{state_path.parent.name}: {len(curves['loss'][0])} logged steps", fontsize=10)
    return _save(figure, out)


# --- attention mask ----------------------------------------------------------------------------------------


def packed_row(lengths: list[int], *, row_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, attention_mask) [1, L] of one row packing documents of these lengths, then row padding."""
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"--lengths ({lengths}) must be one or more positive document lengths")
    total = sum(lengths)
    row_length = total if row_length is None else row_length
    if row_length < total:
        raise ValueError(f"--row_length ({row_length}) must be at least the sum of --lengths ({total})")
    position_ids = torch.cat([torch.arange(length) for length in lengths] + [torch.zeros(row_length - total,
                                                                                          dtype=torch.long)])
    attention_mask = (torch.arange(row_length) < total).long()
    return position_ids[None], attention_mask[None]


def plot_attention_mask(lengths: list[int], *, block_size: int, out, row_length: int | None = None,
                        block_diffusion: bool = True) -> Path:
    """The dense sdpa mask that training builds (`diffusion.masks.build_attention_mask`) for one packed row."""
    from .diffusion.masks import build_attention_mask

    if block_size <= 0:
        raise ValueError(f"--block_size ({block_size}) must be a positive number of tokens, e.g. 4 or 32")
    if block_diffusion and any(length % block_size for length in lengths + [row_length or 0]):
        whole = [-(-length // block_size) * block_size for length in lengths]
        raise ValueError(f"--lengths ({lengths}) and --row_length must be multiples of --block_size ({block_size}) in "
                         f"block diffusion (preprocessing EOS-fills every document to a block boundary); e.g. "
                         f"--lengths {' '.join(map(str, whole))}")
    position_ids, attention_mask = packed_row(lengths, row_length=row_length)
    mask = build_attention_mask(position_ids, attention_mask, block_size=block_size,
                                block_diffusion=block_diffusion, attn_implementation="sdpa")[0, 0]  # [Q, Q]
    length = position_ids.shape[1]

    plt = pyplot()
    figure, axis = plt.subplots(figsize=MASK_SIZE, layout="constrained")
    axis.imshow(mask.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1.25)
    halves = [("x_t", 0), ("x_0", length)] if block_diffusion else [("x_t", 0)]
    boundaries = torch.cumsum(torch.tensor(lengths), 0).tolist()
    for _, offset in halves:
        for start in range(0, length, block_size):  # block grid
            for line in (axis.axhline, axis.axvline):
                line(offset + start - 0.5, color="grey", linewidth=0.3)
        for end in boundaries[:-1] + ([boundaries[-1]] if boundaries[-1] < length else []):  # documents, padding
            for line in (axis.axhline, axis.axvline):
                line(offset + end - 0.5, color="tab:orange", linewidth=1.0)
    if block_diffusion:
        for line in (axis.axhline, axis.axvline):
            line(length - 0.5, color="black", linewidth=1.5)
    centres = [offset + length / 2 - 0.5 for _, offset in halves]
    names = [f"{name} (keys)" for name, _ in halves]
    axis.set_xticks(centres, names)
    axis.set_yticks(centres, [name.replace("keys", "queries") for name in names], rotation=90, va="center")
    axis.tick_params(length=0)
    kind = "block diffusion [x_t ; x_0]" if block_diffusion else "full attention (x_t)"
    axis.set_title(f"{kind}: documents {lengths}, block_size {block_size}\nblue = attends; orange = document "
                   "boundary; grey = block", fontsize=9)
    return _save(figure, out)


# --- generation trace --------------------------------------------------------------------------------------


class CommitTrace:
    """`generate(on_step=trace.record)`: remembers at which denoising step each answer position was committed
    (and edited), counting steps across blocks."""

    def __init__(self, prompt_lengths: list[int], block_length: int):
        self.prompt_lengths, self.block_length = prompt_lengths, block_length
        self.num_steps = 0
        self.commits: list[dict[int, int]] = [{} for _ in prompt_lengths]  # answer position -> step
        self.edits: list[list[tuple[int, int]]] = [[] for _ in prompt_lengths]  # (answer position, step)
        self.block_starts: list[int] = []  # the global step at which each generated block began

    def record(self, step) -> None:
        if step.step == 0:
            self.block_starts.append(self.num_steps)
        for row, prompt_length in enumerate(self.prompt_lengths):
            first = (prompt_length // self.block_length + step.block_index) * self.block_length - prompt_length
            for column in step.committed[row].nonzero().flatten().tolist():
                self.commits[row][first + column] = self.num_steps
            if step.edited is not None:
                for column in step.edited[row].nonzero().flatten().tolist():
                    self.edits[row].append((first + column, self.num_steps))
        self.num_steps += 1


def plot_commit_trace(trace: CommitTrace, answers: list[list[int]], out, *, labels: list[str] | None = None,
                      token_texts: list[list[str]] | None = None) -> Path:
    """One panel per prompt: answer position (x) against the denoising step that committed it (y); each point is
    labelled with its token's text (`token_texts[row][position]`) when the answer is short enough to read."""
    plt = pyplot()
    rows = len(answers)
    figure, axes = plt.subplots(rows, 1, figsize=(TRACE_ROW_SIZE[0], TRACE_ROW_SIZE[1] * rows), squeeze=False,
                                layout="constrained")
    for row, (axis, answer) in enumerate(zip(axes[:, 0], answers)):
        positions = [p for p in sorted(trace.commits[row]) if 0 <= p < len(answer)]
        steps = [trace.commits[row][p] for p in positions]
        axis.scatter(positions, steps, c=steps, cmap="viridis", s=18, label="committed (unmasked)")
        if token_texts is not None and len(answer) <= MAX_LABELLED_TOKENS:
            for position, step in zip(positions, steps):
                axis.annotate(token_texts[row][position], (position, step), textcoords="offset points",
                              xytext=(0, 5), ha="center", fontsize=7, family="monospace")
        edits = [(p, s) for p, s in trace.edits[row] if 0 <= p < len(answer)]
        if edits:
            axis.scatter(*zip(*edits), marker="x", color="tab:red", s=24, label="edited")
        first = -trace.prompt_lengths[row] % trace.block_length
        for boundary in range(first, len(answer), trace.block_length):
            axis.axvline(boundary - 0.5, color="grey", linewidth=0.5)
        axis.set(xlim=(-1, max(len(answer), 1)), ylim=(-0.5, max(trace.num_steps, 1) + 0.5),
                 xlabel="answer position (grey: block boundaries)", ylabel="denoising step")
        title = f"prompt {row}" + (f": {labels[row]!r}" if labels else "")
        axis.set_title(f"{title[:90]} - {len(answer)} tokens in {trace.num_steps} steps", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    return _save(figure, out)
