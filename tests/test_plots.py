"""The three pictures (`dfactory-hf plot`, `show-mask`, `generate --trace`): each PNG is opened and checked for its
pixel size and for being more than a blank canvas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import TOKENIZER, demo_model, demo_trainer

import dfactory_hf
from dfactory_hf import plots
from dfactory_hf.cli import main

matplotlib_image = pytest.importorskip("matplotlib.image", reason="the plot extra (matplotlib) is not installed")
TOKENIZER_DIR = Path(dfactory_hf.__file__).parent / "assets" / "tokenizer"


def pixels(path):
    """(height, width) of the PNG and the fraction of its pixels that are not near-white."""
    image = matplotlib_image.imread(str(path))  # [H, W, 4] floats in [0, 1]
    inked = (image[..., :3] < 0.85).any(axis=-1).mean()
    return image.shape[:2], float(inked)


def expected_size(inches: tuple[float, float], rows: int = 1) -> tuple[int, int]:
    return round(inches[1] * rows * plots.DPI), round(inches[0] * plots.DPI)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (tiny) training run with evaluation, checkpointed once: its checkpoint holds trainer_state.json."""
    tmp_path = tmp_path_factory.mktemp("run")
    trainer = demo_trainer(tmp_path, max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2,
                           eval_mask_rates=[0.3, 0.7], save_strategy="steps", save_steps=4)
    trainer.train()
    return Path(trainer.args.output_dir)


def test_plot_draws_the_training_curves_of_a_run(trained_run, tmp_path, capsys):
    assert not (trained_run / "trainer_state.json").exists()  # found in the run's latest checkpoint-N
    out = tmp_path / "curves.png"
    assert main(["plot", str(trained_run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    size, inked = pixels(out)
    assert size == expected_size(plots.CURVES_SIZE)
    assert inked > 0.02


def test_plot_refuses_a_folder_without_trainer_state(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert f"no trainer_state.json in {tmp_path}" in capsys.readouterr().err


def test_show_mask_draws_the_block_diffusion_mask(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["show-mask", "--lengths", "12", "8", "--block_size", "4", "--out", str(out)]) == 0
    size, inked = pixels(out)
    assert size == expected_size(plots.MASK_SIZE)
    assert inked > 0.05
    # The cells drawn are the training mask: a document of 12 tokens has 3 blocks, x_t block 0 of document 0
    # attends to itself only, so the top-left x_t quarter is mostly empty and the picture is not uniform.
    image = matplotlib_image.imread(str(out))[..., :3]
    assert image.std() > 0.1


def test_show_mask_refuses_documents_that_do_not_fill_whole_blocks(tmp_path, capsys):
    assert main(["show-mask", "--lengths", "10", "--block_size", "4", "--out", str(tmp_path / "m.png")]) == 2
    assert ("--lengths ([10]) and --row_length must be multiples of --block_size (4) in block diffusion"
            in capsys.readouterr().err)
    assert not (tmp_path / "m.png").exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llada2")
    demo_model().save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    return directory


def test_generate_trace_draws_when_each_position_was_committed(saved_model, tmp_path, capsys):
    out = tmp_path / "trace.png"
    argv = ["generate", "--model", str(saved_model), "--prompt", "What is 2 + 3?", "--prompt", "Hi",
            "--gen_length", "12", "--block_length", "4", "--steps", "4", "--trace", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    size, inked = pixels(out)
    assert size == expected_size(plots.TRACE_ROW_SIZE, rows=2)  # one panel per prompt
    assert inked > 0.02


def test_commit_trace_records_every_answer_position_once():
    from dfactory_hf import generate

    model = demo_model()
    prompts = [TOKENIZER("What is 2 + 3?")["input_ids"], TOKENIZER("Hi")["input_ids"]]
    trace = plots.CommitTrace([len(p) for p in prompts], block_length=4)
    answers = generate(model, prompts, gen_length=12, block_length=4, steps=4, eos_token_id=None,
                       mask_token_id=TOKENIZER.mask_token_id, on_step=trace.record)
    for row, answer in enumerate(answers):
        committed = {p for p in trace.commits[row] if 0 <= p < len(answer)}
        assert committed == set(range(len(answer)))
        block_ends = trace.block_starts[1:] + [trace.num_steps]
        for position, step in trace.commits[row].items():
            block = (len(prompts[row]) + position) // 4 - len(prompts[row]) // 4  # generated blocks from 0
            assert trace.block_starts[block] <= step < block_ends[block]  # committed while its block was decoded
    assert len(trace.block_starts) >= 3  # 12 tokens in blocks of 4


def test_the_console_script_draws_the_mask(tmp_path):
    script = Path(sys.executable).with_name("dfactory-hf")
    if not script.is_file():
        pytest.skip(f"no dfactory-hf console script next to {sys.executable} (the package is not pip-installed)")
    out = tmp_path / "mask.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(dfactory_hf.__file__).parents[1])}
    result = subprocess.run([str(script), "show-mask", "--lengths", "8", "4", "--block_size", "4", "--row_length",
                             "16", "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    size, inked = pixels(out)
    assert size == expected_size(plots.MASK_SIZE)
    assert inked > 0.05


def test_a_missing_matplotlib_is_named_with_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    assert main(["show-mask", "--lengths", "4", "--block_size", "4", "--out", str(tmp_path / "m.png")]) == 2
    assert "pip install 'dfactory_hf[plot]'" in capsys.readouterr().err
