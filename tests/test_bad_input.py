"""Bad input is refused before any training step, named and with the fix; faults lose no checkpoint.

One table row per class of bad input (a flag out of its range, a wrong path, a bad data file or row, a bad
checkpoint), each asserting the exception, that no training step ran, and the words its message must hold; then
the faults: a kill during a save, a full disk, SIGTERM with --save_on_interrupt. The number of handled cases is
printed at the end of the run (tests/conftest.py)::

    python -m pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from model_helpers import tiny_model, to_hub_state_dict, write_checkpoint
from test_examples_and_configs import _load_example
from trainer_helpers import TOKENIZER, demo_args, demo_data, demo_model, demo_trainer
from transformers import AutoModelForCausalLM

from dfactory_hf import DiffusionTrainer
from dfactory_hf.data.files import load_data_file
from dfactory_hf.data.preprocessing import prepare_dataset
from dfactory_hf.trainer.checkpoints import COMPLETE_MARKER, newest_complete_checkpoint, read_marker

ROOT = Path(__file__).resolve().parents[1]
EOS, MASK = TOKENIZER.eos_token_id, TOKENIZER.mask_token_id
CHAT = {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"}]}


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """Training steps run in this test (DiffusionTrainer.training_step, the real one, counted)."""
    taken: list[int] = []
    real = DiffusionTrainer.training_step

    def counted(self, *args, **kwargs):
        taken.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionTrainer, "training_step", counted)
    return taken


def assert_refused(call, words: tuple[str, ...], steps: list[int]) -> str:
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    for word in words:
        assert word in message, (word, message)
    assert not steps, "a training step ran before the input was refused"
    return message


# --- flags: every numeric flag against its range ----------------------------------------------------------------

FLAGS = [
    (dict(per_device_train_batch_size=0), "--per_device_train_batch_size (0) must be >= 1"),
    (dict(per_device_eval_batch_size=0), "--per_device_eval_batch_size (0) must be >= 1"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps (0) must be >= 1"),
    (dict(gradient_accumulation_steps=-1), "--gradient_accumulation_steps (-1) must be >= 1"),
    (dict(eval_accumulation_steps=0), "--eval_accumulation_steps (0) must be >= 1"),
    (dict(learning_rate=-1e-3), "--learning_rate (-0.001) must be a finite number >= 0"),
    (dict(learning_rate=float("nan")), "--learning_rate (nan) must be a finite number"),
    (dict(weight_decay=-0.1), "--weight_decay (-0.1) must be a finite number >= 0"),
    (dict(adam_beta1=1.0), "--adam_beta1 (1.0) must be in [0, 1)"),
    (dict(adam_beta2=-0.5), "--adam_beta2 (-0.5) must be in [0, 1)"),
    (dict(adam_epsilon=-1.0), "--adam_epsilon (-1.0) must be a finite number >= 0"),
    (dict(max_grad_norm=-1.0), "--max_grad_norm (-1.0) must be a finite number >= 0"),
    (dict(max_steps=-1, num_train_epochs=0), "--num_train_epochs (0) must be > 0 when --max_steps is not set"),
    (dict(max_steps=-1, num_train_epochs=float("inf")), "--num_train_epochs (inf) must be a finite number"),
    (dict(max_steps=0), "--max_steps (0) must be > 0, or -1"),
    (dict(max_steps=-3), "--max_steps (-3) must be > 0, or -1"),
    (dict(warmup_steps=-1), "--warmup_steps (-1) must be a finite number >= 0"),
    (dict(logging_steps=0), "--logging_steps (0) must be > 0"),
    (dict(save_steps=0), "--save_steps (0) must be > 0"),
    (dict(eval_steps=0, eval_strategy="steps"), "--eval_steps (0) must be > 0"),
    (dict(save_total_limit=-1), "--save_total_limit (-1) must be >= 0"),
    (dict(dataloader_num_workers=-1), "--dataloader_num_workers (-1) must be >= 0"),
    (dict(dataloader_num_workers=1, dataloader_prefetch_factor=0), "--dataloader_prefetch_factor (0) must be >= 1"),
    (dict(seed=-1), "--seed (-1) must be in [0, 4294967296)"),
    (dict(data_seed=2**32), "--data_seed (4294967296) must be in [0, 4294967296)"),
    (dict(label_smoothing_factor=0.1), "--label_smoothing_factor (0.1) must be 0"),
    (dict(block_size=0), "block_size (0) must be > 0"),
    (dict(max_seq_len=66), "max_seq_len (66) must be a positive multiple of block_size (4); use 68"),
    (dict(noise_range_low=0.0), "noise_range_low (0.0) must be in (0, 1]"),
    (dict(noise_range_high=1.5), "noise_range_high (1.5)"),
    (dict(confidence_beta=-1.0), "confidence_beta (-1.0) must be >= 0"),
    (dict(confidence_beta=float("nan")), "confidence_beta (nan) must be >= 0"),
    (dict(min_masked_tokens=-1), "min_masked_tokens (-1) must be >= 0"),
    (dict(loss_chunk_size=0), "loss_chunk_size (0) must be > 0"),
    (dict(max_tokens_per_micro_batch=8), "max_tokens_per_micro_batch (8) must be >= max_seq_len (64)"),
    (dict(dynamic_batching_buffer_size=0), "dynamic_batching_buffer_size (0) must be >= 1"),
    (dict(packing=True, batch_warmup_ratio=1.0), "batch_warmup_ratio (1.0) must be in [0, 1)"),
    (dict(eval_mask_rates=[0.0]), "eval_mask_rates ([0.0]) must all lie in (0, 1]"),
    (dict(eval_generation_samples=-1), "eval_generation_samples (-1) must be >= 0"),
    (dict(eval_gen_length=0), "eval_gen_length (0) > 0"),
    (dict(eval_gen_threshold=0.0), "--eval_gen_threshold (0.0) must be in (0, 1]"),
    (dict(mask_token_id=-1), "--mask_token_id (-1) must be >= 0"),
    (dict(dataset_num_proc=0), "--dataset_num_proc (0) must be >= 1"),
    (dict(dp_replicate_size=0), "--dp_replicate_size (0) must be >= 1"),
    (dict(dp_shard_size=0), "--dp_shard_size (0) must be >= 1, or -1"),
    (dict(sp_size=0), "--sp_size (0) must be >= 1"),
    (dict(ep_size=0), "--ep_size (0) must be >= 1"),
    (dict(router_bias_update_rate=-1e-3), "--router_bias_update_rate (-0.001) must be >= 0"),
    (dict(use_peft=True, lora_r=0), "lora_r (0) must be > 0"),
    (dict(use_peft=True, lora_alpha=0), "--lora_alpha (0) must be > 0"),
    (dict(use_peft=True, lora_dropout=1.0), "--lora_dropout (1.0) must be in [0, 1)"),
]


@pytest.mark.parametrize(("overrides", "words"), FLAGS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                            for o, _ in FLAGS])
def test_flag_out_of_range_is_refused(tmp_path, steps, overrides, words):
    assert words in assert_refused(lambda: demo_args(tmp_path, **overrides), (words,), steps)


# --- the main script: paths, script flags, data files -----------------------------------------------------------


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _script_cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    malformed = _write_lines(tmp / "malformed.jsonl", [CHAT, CHAT, '{"messages": [{"role": "user"', CHAT])
    not_objects = _write_lines(tmp / "lists.jsonl", [CHAT, [1, 2]])
    unusable = _write_lines(tmp / "unusable.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}] * 3)
    unsupervised = _write_lines(tmp / "unsupervised.jsonl", [
        {"input_ids": [5, 40, 41, 6, 42, 43, EOS, EOS], "prompt_length": 4,
         "noisy_input_ids": [5, 40, 41, 6, 42, 43, EOS, EOS]}] * 4)
    no_config = tmp / "no_config"
    no_config.mkdir()
    (no_config / "notes.txt").write_text("not a model")
    empty_dir = tmp / "empty_dir"
    empty_dir.mkdir()
    run_dir = tmp / "run"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoint-2" / COMPLETE_MARKER).write_text("{}")
    types = _write_lines(tmp / "types.jsonl", [PRE, {"input_ids": [10, 11, 12], "prompt_length": "1"}, PRE])
    parts = _write_lines(tmp / "parts.jsonl", [CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "1+2?"}]}, {"role": "assistant", "content": "3"}]}])
    saved = tmp / "saved"
    DatasetDict({"train": Dataset.from_list([CHAT] * 8)}).save_to_disk(str(saved))
    return {
        "empty data file": (["--dataset_path", str(empty)], ("--dataset_path", "empty.jsonl", "is empty")),
        "malformed JSON line": (["--dataset_path", str(malformed)],
                                ("--dataset_path", "malformed.jsonl:3:", "not valid JSON", "fix or remove the line")),
        "a line that is not an object": (["--dataset_path", str(not_objects)],
                                         ("lists.jsonl:2:", "not an object")),
        "rows disagree on a type": (["--dataset_path", str(types)],
                                    ("types.jsonl:2:", "`prompt_length` is a string here but a number at line 1",
                                     "one type in every row")),
        "content a string in one row, parts in another": (["--dataset_path", str(parts)], (
            "parts.jsonl:2:", "`messages[].content` is a list here but a string at line 1")),
        "missing data file": (["--dataset_path", str(tmp / "missing.jsonl")], ("--dataset_path", "does not exist")),
        "data file of unknown kind": (["--dataset_path", str(no_config / "notes.txt")],
                                      ("--dataset_path", "must be .json, .jsonl, .parquet")),
        "no usable row": (["--dataset_path", str(unusable)],
                          ("No usable rows in the train dataset", "skipped 3: conversation has no assistant turn")),
        "nothing supervised": (["--dataset_path", str(unsupervised)],
                               ("Nothing in the train dataset is supervised", "loss 0")),
        "missing train split": (["--dataset_path", str(saved), "--dataset_train_split", "training"],
                                ("--dataset_train_split (training) is not a split", "train")),
        "bad JSON in --model_config_overrides": (["--model_config_overrides", "{num_hidden_layers: 2}"],
                                                 ("--model_config_overrides", "is not valid JSON", "double quotes")),
        "overrides not an object": (["--model_config_overrides", "[1]"], ("must be a JSON object",)),
        "unknown override field": (["--model_config_overrides", '{"num_layers": 2}'],
                                   ("'num_layers' is not a LLaDA2MoeConfig field", "num_hidden_layers")),
        "overrides with a checkpoint": (["--model_name_or_path", "org/model", "--model_config_overrides",
                                         '{"num_hidden_layers": 2}'], ("edit the checkpoint's config.json",)),
        "missing model path": (["--model_name_or_path", "./no/such/model"],
                               ("--model_name_or_path (./no/such/model) does not exist", "not a hub id")),
        "model path that is no hub id": (["--model_name_or_path", "a/b/c"], ("(a/b/c) does not exist",)),
        "model directory without config.json": (["--model_name_or_path", str(no_config)],
                                                ("without config.json", "not a model directory")),
        "model path that is a file": (["--model_name_or_path", str(no_config / "notes.txt")], ("is a file",)),
        "missing tokenizer path": (["--tokenizer_name_or_path", str(tmp / "tok")],
                                   ("--tokenizer_name_or_path", "does not exist")),
        "missing resume path": (["--resume_from_checkpoint", str(tmp / "gone")],
                                ("--resume_from_checkpoint", "does not exist")),
        "empty resume folder": (["--resume_from_checkpoint", str(empty_dir)], ("is an empty directory",)),
        "resume from a run directory": (["--resume_from_checkpoint", str(run_dir)],
                                        ("is a run directory, not a checkpoint", "checkpoint-2")),
        "resume from a folder that is no checkpoint": (["--resume_from_checkpoint", str(no_config)],
                                                       ("is incomplete", COMPLETE_MARKER)),
        "unknown shipped config": (["--model_config", "huge"], ("--model_config ('huge') must be one of", "tiny")),
        "unknown attention backend": (["--attn_implementation", "flash_attention_2"],
                                      ("--attn_implementation ('flash_attention_2') must be one of",)),
        "unknown arithmetic task": (["--arithmetic_task", "mul"], ("--arithmetic_task ('mul') must be one of",)),
        "no training samples": (["--num_train_samples", "0"], ("--num_train_samples (0) must be >= 1",)),
        "held-out share of 1.5": (["--eval_split_size", "1.5"], ("--eval_split_size (1.5)", "fraction in [0, 1)")),
        "gradient accumulation -1 on the command line": (["--gradient_accumulation_steps=-1"],
                                                         ("--gradient_accumulation_steps (-1) must be >= 1",)),
    }


SCRIPT_IDS = ["empty data file", "malformed JSON line", "a line that is not an object", "rows disagree on a type",
              "content a string in one row, parts in another", "missing data file",
              "data file of unknown kind", "no usable row", "nothing supervised", "missing train split",
              "bad JSON in --model_config_overrides", "overrides not an object", "unknown override field",
              "overrides with a checkpoint", "missing model path", "model path that is no hub id",
              "model directory without config.json", "model path that is a file", "missing tokenizer path",
              "missing resume path", "empty resume folder", "resume from a run directory",
              "resume from a folder that is no checkpoint", "unknown shipped config", "unknown attention backend",
              "unknown arithmetic task", "no training samples", "held-out share of 1.5",
              "gradient accumulation -1 on the command line"]


@pytest.mark.parametrize("case", SCRIPT_IDS)
def test_main_script_refuses_before_training(tmp_path, steps, case):
    argv, words = _script_cases(tmp_path)[case]
    demo = _load_example("sft_llada2")
    out = tmp_path / "out"
    # No held-out rows and no evaluation (--eval_split_size 0, --eval_strategy no, --stop_at_exact_match 0): the
    # cases count the rows of the whole file.
    assert_refused(lambda: demo.main(["--output_dir", str(out), "--max_steps", "2", "--num_train_samples", "16",
                                "--num_test_samples", "0", "--eval_split_size", "0", "--eval_strategy", "no",
                                "--stop_at_exact_match", "0", "--disable_tqdm", "true", *argv]), words, steps)
    assert not (out / "model.safetensors").exists()  # no untrained model was saved


def test_user_sees_our_message_as_the_last_line(tmp_path):
    """What a user sees: the example script run as a program ends with our one-line message, not a library's."""
    malformed = _write_lines(tmp_path / "bad.jsonl", [CHAT, "{oops"])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "sft_llada2.py"), "--output_dir",
                          str(tmp_path / "out"), "--dataset_path", str(malformed)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: --dataset_path: ") and "bad.jsonl:2: not valid JSON" in last, last
    assert "The above exception was the direct cause" in run.stderr  # the library's error is kept, chained
    assert not (tmp_path / "out").exists()


# --- data rows: skipped and counted with the reason, or kept and noted ------------------------------------------

PRE = {"input_ids": [10, 11, 12, 13], "prompt_length": 1}
ROWS = [
    ("token id beyond the model's vocabulary", {"input_ids": [10, 300, 12], "prompt_length": 1},
     "token id outside the model's vocabulary (vocab_size 256) in input_ids"),
    ("negative token id", {"input_ids": [10, -5, 12], "prompt_length": 1}, "negative token id in input_ids"),
    ("id valid for the model, not the tokenizer", {"input_ids": [10, len(TOKENIZER), 12], "prompt_length": 1},
     f"token id outside the tokenizer's vocabulary (size {len(TOKENIZER)}) in input_ids: pre-tokenized with another "
     "tokenizer?"),
    ("label beyond the vocabulary", {"input_ids": [10, 11, 12], "prompt_length": 1, "noisy_input_ids": [10, MASK, 12],
                                     "labels": [-100, 999, -100]},
     "token id outside the model's vocabulary (vocab_size 256) in labels"),
    ("noisy id beyond the vocabulary", {"input_ids": [10, 11, 12], "prompt_length": 1,
                                        "noisy_input_ids": [10, MASK, 700]},
     "token id outside the model's vocabulary (vocab_size 256) in noisy_input_ids"),
    ("a fractional token id", {"input_ids": [10, 11.5, 12], "prompt_length": 1},
     "input_ids holds a value that is not an integer token id"),
]


@pytest.mark.parametrize(("name", "row", "reason"), ROWS, ids=[r[0] for r in ROWS])
def test_bad_pre_tokenized_row_is_skipped_with_its_reason(tmp_path, name, row, reason):
    documents, report = prepare_dataset(_mixed(tmp_path, [PRE, row, PRE]), TOKENIZER, block_size=4, max_seq_len=32,
                                        mask_token_id=MASK, model_vocab_size=256)
    assert documents["sample_index"] == [0, 2]
    assert dict(report.skipped) == {reason: 1} and report.first_row_of == {reason: 1}


def _mixed(tmp_path: Path, rows: list[dict]) -> Dataset:
    """The rows read back from a JSON-lines file, as a user's file is: datasets infers each column's type from
    the rows, and holds a column whose rows disagree on the type as the values themselves."""
    return load_data_file(_write_lines(tmp_path / "rows.jsonl", rows))["train"]


def test_values_of_the_wrong_type_are_skipped(tmp_path):
    rows = [{"input_ids": [10, 11, 12], "prompt_length": "1"}, {"input_ids": [10, 11, 12], "prompt_length": "0"}]
    with pytest.raises(ValueError, match=r"No usable rows.*\n.*\n  skipped 2: prompt_length is not an integer "
                                         r"\(first at row 0\)"):
        prepare_dataset(_mixed(tmp_path, rows), TOKENIZER, block_size=4, max_seq_len=32, mask_token_id=MASK)


def test_integral_floats_keep_valid_rows():
    """A float column inferred from one odd row: the valid rows are kept, only the odd one is skipped."""
    rows = [{"input_ids": [10, 11, 12], "prompt_length": 1}, {"input_ids": [10, 11.5], "prompt_length": 1.0},
            {"input_ids": [10.0, 11.0, 12.0, 13.0], "prompt_length": 2.0}]
    documents, report = prepare_dataset(Dataset.from_list(rows), TOKENIZER, block_size=4, max_seq_len=32,
                                        mask_token_id=MASK)
    assert documents["sample_index"] == [0, 2]
    assert documents["input_ids"][1] == [10, 11, 12, 13, EOS, EOS, EOS, EOS] and documents["prompt_length"][1] == 2
    assert dict(report.skipped) == {"input_ids holds a value that is not an integer token id": 1}


def _chat(*contents) -> dict:
    return {"messages": [{"role": "user", "content": contents[0]}, {"role": "assistant", "content": contents[1]}]}


def test_message_content_as_text_parts_equals_the_string():
    parts = _chat([{"type": "text", "text": "1+"}, {"type": "text", "text": "2?"}], [{"type": "text", "text": "3"}])
    documents, report = prepare_dataset(Dataset.from_list([parts]), TOKENIZER, block_size=4, max_seq_len=32,
                                        mask_token_id=MASK)
    expected, _ = prepare_dataset(Dataset.from_list([CHAT]), TOKENIZER, block_size=4, max_seq_len=32,
                                  mask_token_id=MASK)
    assert documents["input_ids"] == expected["input_ids"] and not report.skipped


def _parts(*texts, kind="text") -> list[dict]:
    return [{"type": kind, "text": text} for text in texts]


@pytest.mark.parametrize(("rows", "reason"), [
    ([_chat(_parts("1+2?"), _parts("3")), _chat(_parts(None, kind="image_url"), _parts("3"))],
     "a message's content has a part that is not text"),
    ([CHAT, _chat("<|assistant|>2", "3")], "control-token text <|assistant|> inside a message's content"),
    ([CHAT, _chat("1+2?<|endoftext|>", "3")], "control-token text <|endoftext|> inside a message's content"),
], ids=["non-text part", "role token in content", "EOS text in content"])
def test_bad_message_content_is_skipped(tmp_path, rows, reason):
    documents, report = prepare_dataset(_mixed(tmp_path, rows), TOKENIZER, block_size=4, max_seq_len=32,
                                        mask_token_id=MASK)
    assert documents["sample_index"] == [0]
    (found,) = report.skipped
    assert found.startswith(reason) and report.first_row_of[found] == 1


def test_control_token_text_in_a_plain_string_is_noted():
    rows = [{"text": "plain"}, {"text": "already rendered <|user|>hi<|assistant|>yo"}]
    documents, report = prepare_dataset(Dataset.from_list(rows), TOKENIZER, block_size=4, max_seq_len=64,
                                        mask_token_id=MASK)
    assert len(documents) == 2
    assert "kept 1 with a note: control-token text (<|user|>) in a plain string" in report.summary()


def test_out_of_vocabulary_rows_never_reach_the_embedding(tmp_path, steps):
    """The issue's case: the first step trained, the second crashed inside the embedding. Now the rows are skipped
    and every step trains."""
    good = [{"input_ids": [5, 40, 41, 6, 42, 43, EOS, EOS], "prompt_length": 4}] * 8
    bad = [{"input_ids": [5, 40, 4000, 6, 42, 43, EOS, EOS], "prompt_length": 4},
           {"input_ids": [5, -1, 41, 6, 42, 43, EOS, EOS], "prompt_length": 4}] * 4
    trainer = demo_trainer(tmp_path, data={"train": Dataset.from_list(good + bad), "test": None}, max_steps=4)
    trainer.train()
    assert trainer.state.global_step == 4 and len(steps) == 4
    report = trainer.data_reports[0]
    assert report.skipped == {"token id outside the model's vocabulary (vocab_size 128) in input_ids": 4,
                              "negative token id in input_ids": 4}


def test_special_id_outside_the_model_is_refused(tmp_path, steps):
    message = assert_refused(lambda: demo_trainer(tmp_path, model=demo_model(vocab_size=2)),
                             ("token id", "vocab_size 2"), steps)
    assert "outside the model's vocabulary" in message


def test_a_run_that_would_take_no_step_fails(tmp_path, steps):
    data = {"train": Dataset.from_list([CHAT] * 2), "test": None}
    trainer = demo_trainer(tmp_path, data=data, max_steps=-1, num_train_epochs=1, dataloader_drop_last=True)
    assert_refused(trainer.train, ("Training ran no optimizer step", "2 training documents",
                             "--per_device_train_batch_size 4"), steps)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --- evaluation: given noise never stands in for the mask-rate grid ---------------------------------------------


def test_elbo_grid_masks_rows_that_bring_their_own_noise(tmp_path):
    # Rows ending with EOS, so the clean documents are the given ids as they are (no EOS appended), like the noised.
    clean = [{"input_ids": [5, 40 + i, 41, 6, 42, 43, 44, EOS], "prompt_length": 4} for i in range(8)]
    noised = [{**row, "noisy_input_ids": row["input_ids"][:4] + [MASK] * 4} for row in clean]
    metrics = {}
    for name, rows in (("clean", clean), ("noised", noised)):
        trainer = demo_trainer(tmp_path / name, data={"train": Dataset.from_list(clean),
                                                      "test": Dataset.from_list(rows)}, eval_mask_rates=[0.25, 1.0])
        metrics[name] = trainer.evaluate()
    for key in ("eval_loss_t0.25", "eval_loss_t1", "eval_elbo_nll"):
        assert metrics["noised"][key] == pytest.approx(metrics["clean"][key], rel=1e-6), key
    assert metrics["noised"]["eval_loss_t0.25"] != metrics["noised"]["eval_loss_t1"]


def test_held_out_rows_that_supervise_nothing_report_no_loss(tmp_path):
    rows = [{"input_ids": [5, 40, 41, 6, 42, 43, EOS, EOS], "prompt_length": 4,
             "noisy_input_ids": [5, 40, 41, 6, 42, 43, EOS, EOS]}] * 4
    trainer = demo_trainer(tmp_path, data={"train": Dataset.from_list([CHAT] * 4), "test": Dataset.from_list(rows)})
    metrics = trainer.evaluate()
    assert metrics["eval_supervised_tokens"] == 0
    assert metrics["eval_loss"] != metrics["eval_loss"]  # NaN: nothing to score, not a perfect 0


# --- checkpoints: every tensor present with its shape; partial ones refused -------------------------------------


@pytest.fixture(scope="module")
def reference_model():
    return tiny_model(seed=1)


def _checkpoint(tmp_path: Path, model, edit=None, name="ckpt") -> Path:
    tensors = to_hub_state_dict(model.state_dict())
    if edit is not None:
        edit(tensors)
    return write_checkpoint(tmp_path / name, tensors, model.config)


CHECKPOINTS = [
    ("missing attention weight", lambda t: t.pop("model.layers.1.attention.query_key_value.weight"),
     ("missing tensor model.layers.1.attention.query_key_value.weight", "silently re-initialised")),
    ("missing router weight", lambda t: t.pop("model.layers.2.mlp.gate.weight"),
     ("missing tensor model.layers.2.mlp.gate.weight",)),
    ("missing router bias", lambda t: t.pop("model.layers.2.mlp.gate.expert_bias"),
     ("missing tensor model.layers.2.mlp.gate.expert_bias",)),
    ("mis-shaped norm", lambda t: t.__setitem__("model.norm.weight", torch.ones(7)),
     ("model.norm.weight: expected shape (", "found (7,)")),
    ("missing lm_head", lambda t: t.pop("lm_head.weight"), ("missing tensor lm_head.weight",)),
]


@pytest.mark.parametrize(("name", "edit", "words"), CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_incomplete_checkpoint_is_refused(tmp_path, steps, reference_model, name, edit, words):
    source = _checkpoint(tmp_path, reference_model, edit)
    message = assert_refused(lambda: AutoModelForCausalLM.from_pretrained(source), words, steps)
    assert str(source) in message  # the message names the checkpoint it refused


def test_extra_tensors_are_reported(tmp_path, reference_model, caplog):
    source = _checkpoint(tmp_path, reference_model, lambda t: t.__setitem__("model.mtp.weight", torch.zeros(2)))
    model = AutoModelForCausalLM.from_pretrained(source)
    assert "1 tensors the model has no place for (ignored): model.mtp.weight" in caplog.text
    assert type(model).__name__ == "LLaDA2MoeForCausalLM"


def test_truncated_and_missing_shard_files_are_refused(tmp_path, steps, reference_model):
    source = _checkpoint(tmp_path, reference_model)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_refused(lambda: AutoModelForCausalLM.from_pretrained(source), ("is truncated or not a safetensors file",), steps)
    weights.unlink()
    (source / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    message = assert_refused(lambda: AutoModelForCausalLM.from_pretrained(source), ("names a shard that is missing",),
                             steps)
    assert "model-00001-of-00002.safetensors" in message


SAVE_EVERY_2 = dict(save_strategy="steps", save_steps=2, save_total_limit=1)


def test_kill_during_save_leaves_the_previous_checkpoint_usable(tmp_path, steps):
    """A save killed after the weights (and before the marker): ignored by `last`, refused by from_pretrained."""
    trainer = demo_trainer(tmp_path, max_steps=4, **SAVE_EVERY_2)
    real = trainer._save_rng_state

    def killed(output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise KeyboardInterrupt  # what a kill (SIGINT) raises mid-save; SIGKILL stops at the same point
        return real(output_dir)

    trainer._save_rng_state = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    output_dir = tmp_path / "out"
    assert (output_dir / "checkpoint-4" / "model.safetensors").exists() and not read_marker(str(output_dir /
                                                                                                 "checkpoint-4"))
    assert newest_complete_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")
    assert_refused(lambda: AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-4"),
             ("checkpoint-4 is an incomplete training checkpoint", COMPLETE_MARKER), [])
    steps.clear()
    resumed = demo_trainer(tmp_path, max_steps=4, **SAVE_EVERY_2)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 4 and len(steps) == 2  # steps 3 and 4, from checkpoint-2
    assert read_marker(str(output_dir / "checkpoint-4"))["global_step"] == 4


def test_resume_into_another_model_is_refused(tmp_path, steps):
    demo_trainer(tmp_path, max_steps=2, **SAVE_EVERY_2).train()
    steps.clear()
    other = demo_trainer(tmp_path, model=demo_model(num_hidden_layers=2), max_steps=4, **SAVE_EVERY_2)
    message = assert_refused(lambda: other.train(resume_from_checkpoint="last"),
                             ("was written by another model", "model.layers.2", "only in the checkpoint"), steps)
    assert "checkpoint-2" in message


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    trainer = demo_trainer(tmp_path, max_steps=4, **SAVE_EVERY_2)
    real = trainer._save_optimizer_and_scheduler

    def full_disk(output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, "No space left on device", output_dir + "/optimizer.pt")
        return real(output_dir)

    trainer._save_optimizer_and_scheduler = full_disk
    with pytest.raises(OSError) as error:
        trainer.train()
    message = str(error.value)
    output_dir = tmp_path / "out"
    assert error.value.errno == errno.ENOSPC and "Disk full while writing checkpoint" in message
    assert f"the previous complete checkpoint ({output_dir / 'checkpoint-2'}) is intact" in message
    assert "--resume_from_checkpoint last" in message
    assert not (output_dir / "checkpoint-4").exists()  # the partial one was removed, giving the space back
    assert read_marker(str(output_dir / "checkpoint-2"))["global_step"] == 2
    AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint-2")


def _mount_tiny_filesystem(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_on_a_real_tiny_filesystem(tmp_path):
    """The same with the real writers on a tmpfs with room for one checkpoint (root only)."""
    disk = tmp_path / "disk"
    if not _mount_tiny_filesystem(disk, "40m"):
        pytest.skip("mounting a tmpfs needs root; the monkeypatched-writer test covers the message")
    try:
        trainer = demo_trainer(tmp_path, max_steps=6, output_dir=str(disk / "out"), save_strategy="steps",
                               save_steps=2, save_total_limit=None)
        with pytest.raises(OSError, match="Disk full while writing checkpoint") as error:
            trainer.train()
        saved = newest_complete_checkpoint(str(disk / "out"))
        assert saved is not None and str(error.value).count(saved) == 1
        AutoModelForCausalLM.from_pretrained(saved)
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: safetensors may still map a file


def test_sigterm_with_save_on_interrupt_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "sft_llada2.py"), "--output_dir", str(out), "--max_steps", "100000",
         "--logging_steps", "1", "--save_strategy", "no", "--num_train_samples", "64", "--num_test_samples", "8",
         "--final_generation_samples", "0", "--save_on_interrupt", "true", "--disable_tqdm", "true"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in process.stdout:  # wait for the first logged step: the handler is installed, training runs
            lines.append(line)
            if "'loss'" in line:
                break
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    printed = "".join(lines) + rest
    assert process.returncode == 143, printed[-2000:]
    assert "SIGTERM: saved checkpoint-" in printed and "Traceback" not in printed
    checkpoint = newest_complete_checkpoint(str(out))
    assert checkpoint is not None and read_marker(checkpoint)["global_step"] >= 1
    AutoModelForCausalLM.from_pretrained(checkpoint)
    assert not (out / "model.safetensors").exists()  # stopped: no final save of a half-trained model as "done"
