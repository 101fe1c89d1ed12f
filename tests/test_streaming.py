"""Streaming (`datasets.IterableDataset`) training data: token-budget micro-batches from a look-ahead buffer, an
exact resume of the data position, streaming mixtures and the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import IterableDataset, load_dataset
from trainer_helpers import TOKENIZER, demo_args, demo_data, demo_model, record_collated
from trl import DatasetMixtureConfig
from trl.scripts.utils import DatasetConfig

from dfactory_hf import DiffusionTrainer
from dfactory_hf.data.sources import hold_out_stream, stream_mixture
from dfactory_hf.recipes.sft import parse_arguments

BUDGET = 128
NO_ASSISTANT = {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def train_file(tmp_path, num_rows=20) -> str:
    rows = list(demo_data(num_train=num_rows, num_test=1)["train"])
    rows.insert(5, NO_ASSISTANT)  # skipped and counted as the stream reaches it
    return write_jsonl(tmp_path / "train.jsonl", rows)


def stream_of(path) -> IterableDataset:
    return load_dataset("json", data_files=path, split="train", streaming=True)


def streaming_trainer(tmp_path, path, name, **overrides):
    values = dict(packing=True, max_seq_len=64, max_tokens_per_micro_batch=BUDGET, dynamic_batching_buffer_size=8,
                  gradient_accumulation_steps=2, max_steps=8, logging_steps=1, learning_rate=1e-2)
    values.update(overrides)
    trainer = DiffusionTrainer(model=demo_model(), args=demo_args(tmp_path / name, **values),
                               train_dataset=stream_of(path), processing_class=TOKENIZER)
    seen = record_collated(trainer, lambda features: [(f["epoch"], f["sample_index"], f["num_tokens"], f.get("row"))
                                                      for f in features])
    return trainer, seen


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


LAYOUTS = {
    "packing": dict(packing=True),
    "padding_free": dict(packing=False, padding_free=True, block_diffusion_mode=False),
    "padded": dict(packing=False),
    "complementary": dict(packing=False, complementary_masking=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_stream_trains_in_token_budget_micro_batches_read_lazily(tmp_path, layout):
    path = train_file(tmp_path)
    before = {name: p.detach().clone() for name, p in demo_model().named_parameters()}
    trainer, seen = streaming_trainer(tmp_path, path, "run", **LAYOUTS[layout])
    assert isinstance(trainer.train_dataset, IterableDataset)  # not converted into a map-style Dataset
    trainer.train()
    assert trainer.state.global_step == 8 and len(seen) == 16
    assert isinstance(trainer.train_dataset, IterableDataset)
    copies = 2 if layout == "complementary" else 1
    for batch in seen:
        tokens = [num_tokens * copies for _, _, num_tokens, _ in batch]
        cost = len(tokens) * max(tokens) if layout == "padded" else sum(tokens)
        assert cost <= BUDGET
        if layout == "packing":
            assert len({row for *_, row in batch}) * 64 <= BUDGET  # rows of max_seq_len
    # 21 rows, the one with no assistant turn skipped: 20 documents a pass; two a micro-batch (one as a complementary
    # pair), so 8 steps run past the first pass (all but the complementary run).
    first_pass = [index for batch in seen for epoch, index, *_ in batch if epoch == 0]
    assert len(set(first_pass)) == len(first_pass) and 5 not in first_pass
    assert set(first_pass) <= set(range(21)) and len(first_pass) >= 16
    assert any(epoch == 1 for batch in seen for epoch, *_ in batch) == (copies == 1)
    report = trainer.data_reports[0]
    # What was read: the whole first pass, or (complementary) the two buffers of 8 documents the 8 steps took.
    assert (report.num_rows, report.num_documents) == ((21, 20) if copies == 1 else (17, 16))
    assert report.skipped["conversation has no assistant turn"] == 1
    assert report.first_row_of["conversation has no assistant turn"] == 5
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "model.word_embeddings.weight" in changed and len(changed) > len(before) // 2
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(trainer).values())


def test_a_resumed_stream_continues_exactly_where_the_uninterrupted_run_was(tmp_path):
    # 20 documents a pass (52 tokens each, two per micro-batch), buffers of 12: checkpoint 1 lies inside the first
    # buffer, 5 at the end of the first pass, 7 inside the second pass's first buffer.
    path = train_file(tmp_path)
    settings = dict(save_strategy="steps", save_steps=1, dynamic_batching_buffer_size=12)
    straight, trained = streaming_trainer(tmp_path, path, "run", **settings)
    straight.train()
    out = tmp_path / "run" / "out"
    positions = {step: json.loads((out / f"checkpoint-{step}" / "stream_state" / "process-0.json").read_text())
                 for step in (1, 5, 7)}
    assert [(p["epoch"], p["num_micro_batches_taken"]) for p in positions.values()] == [(0, 2), (0, 4), (1, 4)]
    for step in (1, 5, 7):
        shutil.copytree(out / f"checkpoint-{step}", tmp_path / f"from{step}" / "out" / f"checkpoint-{step}")
        resumed, resumed_batches = streaming_trainer(tmp_path, path, f"from{step}", **settings)
        resumed.train(resume_from_checkpoint="last")  # the only checkpoint there: the later ones are not copied
        assert resumed.state.global_step == 8
        assert resumed_batches == trained[2 * step:]  # the same micro-batches, epochs and rows, in the same order
        assert {s: loss for s, loss in losses(resumed).items() if s > step} == {
            s: loss for s, loss in losses(straight).items() if s > step}
        for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
            torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
        assert resumed.data_reports[0].to_dict() == straight.data_reports[0].to_dict()
        assert straight.data_reports[0].num_rows == 21  # the first pass, counted once


def test_a_stream_position_is_refused_under_other_batching_settings(tmp_path):
    path = train_file(tmp_path)
    straight, _ = streaming_trainer(tmp_path, path, "run", save_strategy="steps", save_steps=2, max_steps=2)
    straight.train()
    other, _ = streaming_trainer(tmp_path, path, "other", dynamic_batching_buffer_size=16)
    with pytest.raises(ValueError, match="other settings .*buffer_size 8 -> 16.* --ignore_data_skip"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "out" / "checkpoint-2"))


def test_a_streaming_mixture_interleaves_by_fraction(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(2000)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(2000)])
    mixture = DatasetMixtureConfig(streaming=True, datasets=[DatasetConfig(path=first, fraction=3.0),
                                                             DatasetConfig(path=second, fraction=1.0)])
    stream = stream_mixture(mixture, seed=0)
    assert isinstance(stream, IterableDataset)
    rows = [row["text"] for row in stream.take(400)]
    from_first = sum(text.startswith("a") for text in rows)
    assert 260 <= from_first <= 340  # 3:1 of 400 is 300 (binomial sd 8.7)
    # Each source in its own order, none repeated; seeded: the same interleaving again.
    assert [t for t in rows if t.startswith("a")] == [f"a {i}" for i in range(from_first)]
    assert [row["text"] for row in stream_mixture(mixture, seed=0).take(400)] == rows
    # Its position resumes exactly (datasets' state_dict holds the interleaving's random state): what the trainer saves.
    rows_so_far = iter(stream)
    [next(rows_so_far) for _ in range(37)]
    again = stream_mixture(mixture, seed=0)
    again.load_state_dict(stream.state_dict())
    resumed = iter(again)
    assert [next(resumed)["text"] for _ in range(30)] == [next(rows_so_far)["text"] for _ in range(30)]


def test_a_stream_held_out_split_is_its_first_rows(tmp_path):
    stream = stream_of(write_jsonl(tmp_path / "t.jsonl", [{"text": f"r {i}"} for i in range(10)]))
    train, held_out = hold_out_stream(stream, size=3, flag="--eval_split_size")
    assert held_out["text"] == ["r 0", "r 1", "r 2"] and [row["text"] for row in train] == [
        f"r {i}" for i in range(3, 10)]
    with pytest.raises(ValueError, match=r"--eval_split_size \(0.01\) is a share .* give a row count"):
        hold_out_stream(stream, size=0.01, flag="--eval_split_size")


def test_the_recipe_streams_a_dataset_path(tmp_path):
    from dfactory_hf.recipes.sft import load_data

    path = train_file(tmp_path)
    script, _ = parse_arguments(["--dataset_path", path, "--streaming", "true", "--eval_split_size", "4",
                                 "--output_dir", str(tmp_path / "out")])
    data = load_data(script, seed=0)
    assert isinstance(data["train"], IterableDataset) and len(data["test"]) == 4
    script, _ = parse_arguments(["--dataset_path", path, "--streaming", "true", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"--eval_split_size \(0.01\)"):
        load_data(script, seed=0)


def test_a_stream_is_refused_without_max_steps_or_a_token_budget(tmp_path):
    path = train_file(tmp_path)

    def trainer(**overrides):
        args = demo_args(tmp_path, **{"max_tokens_per_micro_batch": BUDGET, **overrides})
        return DiffusionTrainer(model=demo_model(), args=args, train_dataset=stream_of(path),
                                processing_class=TOKENIZER)

    with pytest.raises(ValueError, match=r"no length, so --max_steps \(-1\) must be set"):
        trainer(max_steps=-1, num_train_epochs=1)
    with pytest.raises(ValueError, match="batched by token budget .* --max_tokens_per_micro_batch"):
        trainer(max_tokens_per_micro_batch=None)
    with pytest.raises(ValueError, match=r"--batch_warmup_ratio \(0.5\)"):
        trainer(batch_warmup_ratio=0.5)
    one_row = stream_of(write_jsonl(tmp_path / "one.jsonl", list(demo_data(num_train=1, num_test=1)["train"])))
    short = DiffusionTrainer(model=demo_model(), args=demo_args(tmp_path, max_tokens_per_micro_batch=BUDGET,
                                                                gradient_accumulation_steps=2),
                             train_dataset=one_row, processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="Training ran no optimizer step: streamed training documents"):
        short.train()  # one document makes no step of 2 micro-batches
    with pytest.raises(ValueError, match="a torch IterableDataset .* datasets.IterableDataset.from_generator"):
        DiffusionTrainer(model=demo_model(), args=demo_args(tmp_path, max_tokens_per_micro_batch=BUDGET),
                         train_dataset=_TorchStream(), processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="held-out data must be map-style"):
        DiffusionTrainer(model=demo_model(), args=demo_args(tmp_path, max_tokens_per_micro_batch=BUDGET),
                         train_dataset=stream_of(path), eval_dataset=stream_of(path), processing_class=TOKENIZER)


class _TorchStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])
