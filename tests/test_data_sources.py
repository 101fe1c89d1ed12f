"""Data sources: a folder of shards, a weighted mixture of sources (TRL's `datasets:` list), and the seeded
held-out split made when the data has none; through the training script as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from datasets import IterableDataset
from trl import DatasetMixtureConfig

from dfactory_hf.data.sources import hold_out, load_mixture, load_source

ROOT = Path(__file__).resolve().parents[1]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _source(tmp_path: Path, tag: str, count: int) -> Path:
    return _write(tmp_path / f"{tag}.jsonl", [_chat(f"{tag} {i} + 1?", f"{i + 1}") for i in range(count)])


def _tags(dataset) -> Counter:
    return Counter(row["messages"][0]["content"].split()[0] for row in dataset)


def _example():
    spec = importlib.util.spec_from_file_location("sft_llada2_sources", ROOT / "examples" / "sft_llada2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_folder_of_shards_loads_every_file_in_name_order(tmp_path):
    _write(tmp_path / "shards" / "part-0001.jsonl", [_chat("b 1?", "1")])
    _write(tmp_path / "shards" / "part-0000.jsonl", [_chat("a 1?", "1"), _chat("a 2?", "2")])
    _write(tmp_path / "shards" / "nested" / "part-0002.jsonl", [_chat("c 1?", "1")])
    data = load_source(str(tmp_path / "shards"), flag="--dataset_path")
    questions = [row["messages"][0]["content"] for row in data["train"]]
    assert questions == ["c 1?", "a 1?", "a 2?", "b 1?"]  # nested/part-0002 sorts first by path


def test_a_bad_line_in_one_shard_is_named_by_file_and_line(tmp_path):
    _write(tmp_path / "shards" / "part-0000.jsonl", [_chat("a 1?", "1")])
    bad = tmp_path / "shards" / "part-0001.jsonl"
    bad.write_text(json.dumps(_chat("b 1?", "1")) + "\n{\"messages\": [\n")
    with pytest.raises(ValueError, match=r"--dataset_path: .*part-0001.jsonl:2: not valid JSON"):
        load_source(str(tmp_path / "shards"), flag="--dataset_path")


def test_mixed_kinds_in_a_folder_are_refused(tmp_path):
    _write(tmp_path / "shards" / "a.jsonl", [_chat("a 1?", "1")])
    load_source(str(tmp_path / "shards"), flag="--dataset_path")["train"].to_parquet(tmp_path / "shards" / "b.parquet")
    with pytest.raises(ValueError, match=r"more than one kind \(json, parquet\)"):
        load_source(str(tmp_path / "shards"), flag="--dataset_path")


def test_weights_three_to_one_give_that_share_of_the_mixture(tmp_path):
    mixture = DatasetMixtureConfig(datasets=[
        {"path": str(_source(tmp_path, "a", 300)), "fraction": 3.0},
        {"path": str(_source(tmp_path, "b", 300)), "fraction": 1.0},
    ])
    data = load_mixture(mixture, seed=0)["train"]
    tags = _tags(data)
    assert tags == {"a": 300, "b": 100}  # no row repeated: the largest mixture with a 3:1 share
    # b's rows are a seeded sample of the whole file, not its first 100 rows (TRL's rule).
    b_numbers = sorted(int(row["messages"][0]["content"].split()[1]) for row in data if row["messages"][0]
                       ["content"].startswith("b"))
    assert max(b_numbers) > 150
    again = load_mixture(mixture, seed=0)["train"]
    other = load_mixture(mixture, seed=1)["train"]
    assert again["messages"] == data["messages"]
    assert other["messages"] != data["messages"]


def test_mixture_errors_name_the_source(tmp_path):
    a = str(_source(tmp_path, "a", 10))
    prompt_completion = _write(tmp_path / "pc.jsonl", [{"prompt": "1 + 1?", "completion": "2"}])
    cases = {
        "one fraction unset": ([{"path": a, "fraction": 1.0}, {"path": a}], r"datasets\[1\].fraction is unset"),
        "negative fraction": ([{"path": a, "fraction": -1.0}, {"path": a, "fraction": 1.0}],
                              r"datasets\[0\].fraction \(-1.0\) must be >= 0"),
        "missing file": ([{"path": str(tmp_path / "missing.jsonl")}], r"datasets\[0\].path .*does not exist"),
        "other columns": ([{"path": a}, {"path": str(prompt_completion)}], r"different columns .*`columns:`"),
        "unknown column": ([{"path": a, "columns": ["text"]}], r"datasets\[0\].columns: text not in"),
    }
    for name, (sources, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_mixture(DatasetMixtureConfig(datasets=sources), seed=0)
        print("refused:", name)
    # Streaming mixtures are read lazily (tests/test_streaming.py), no longer refused.
    streamed = load_mixture(DatasetMixtureConfig(datasets=[{"path": a}], streaming=True), seed=0)["train"]
    assert isinstance(streamed, IterableDataset) and len(list(streamed)) == 10


def test_held_out_split_is_seeded_and_disjoint(tmp_path):
    data = load_source(str(_source(tmp_path, "a", 200)), flag="--dataset_path")
    split = hold_out(data, size=0.05, train_split="train", test_split="test", seed=3)
    train = {row["messages"][0]["content"] for row in split["train"]}
    test = {row["messages"][0]["content"] for row in split["test"]}
    assert len(test) == 10 and len(train) == 190 and not train & test
    assert split["test"]["messages"] == hold_out(data, size=0.05, train_split="train", test_split="test",
                                                 seed=3)["test"]["messages"]
    assert len(hold_out(data, size=7, train_split="train", test_split="test", seed=3)["test"]) == 7
    assert "test" not in hold_out(data, size=0, train_split="train", test_split="test", seed=3)
    with pytest.raises(ValueError, match=r"--eval_split_size \(200\) would hold out 200 of the 200"):
        hold_out(data, size=200, train_split="train", test_split="test", seed=3)


def test_the_script_trains_on_a_recipe_mixture_and_evaluates_on_the_held_out_rows(tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({
        **yaml.safe_load((ROOT / "configs" / "sft" / "tiny.yaml").read_text()),
        "datasets": [{"path": str(_source(tmp_path, "a", 90)), "fraction": 3},
                     {"path": str(_source(tmp_path, "b", 90)), "fraction": 1}],
        "eval_split_size": 0.1, "max_steps": 2, "eval_strategy": "no", "eval_generation_samples": 0,
        "stop_at_exact_match": 0, "logging_steps": 1, "final_generation_samples": 0,
        "output_dir": str(tmp_path / "out"), "disable_tqdm": True, "eval_mask_rates": [0.5],
    }))
    results = _example().main(["--config", str(recipe)])
    assert results["eval_loss"] > 0 and results["train_loss"] > 0
    rows = {report["split"]: report["num_rows"] for report in
            json.loads((tmp_path / "out" / "data_report.json").read_text())}
    assert rows == {"train": 108, "eval": 12}, rows  # 90 + 30 rows mixed, 10% of them held out
    assert "| held-out loss (start -> end)" in capsys.readouterr().out


def test_the_script_refuses_a_mixture_with_dataset_path(tmp_path):
    a = str(_source(tmp_path, "a", 10))
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({"datasets": [{"path": a}], "output_dir": str(tmp_path / "out")}))
    with pytest.raises(ValueError, match=r"a `datasets:` mixture and --dataset_path are both set"):
        _example().main(["--config", str(recipe), "--dataset_path", a])
