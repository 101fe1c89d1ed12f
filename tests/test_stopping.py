"""`--stop_at_exact_match`: training stops at the first evaluation whose generated exact match reaches the target,
and the flag is refused where it could never be checked."""

from __future__ import annotations

import pytest
from datasets import DatasetDict

from trainer_helpers import demo_args, demo_data, demo_trainer


@pytest.mark.slow
def test_training_stops_once_exact_match_reaches_the_target(tmp_path):
    # Four problems, trained on and then answered: memorised within a few hundred steps, far below max_steps.
    data = demo_data(num_train=4, num_test=4, task="add")
    data = DatasetDict({"train": data["train"], "test": data["train"]})
    trainer = demo_trainer(tmp_path, data=data, max_steps=2000, eval_strategy="steps", eval_steps=50,
                           eval_generation_samples=4, eval_gen_length=16, stop_at_exact_match=0.75,
                           per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=50)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_exact_match" in entry]
    assert evaluations[-1]["eval_exact_match"] >= 0.75
    assert all(entry["eval_exact_match"] < 0.75 for entry in evaluations[:-1])  # the first evaluation that reached it
    assert trainer.state.global_step == evaluations[-1]["step"] < 2000


@pytest.mark.parametrize("overrides, message", [
    (dict(stop_at_exact_match=1.5, eval_strategy="steps", eval_generation_samples=4),
     r"--stop_at_exact_match \(1.5\) must be in \(0, 1\]"),
    (dict(stop_at_exact_match=0.9, eval_generation_samples=4), r"set --eval_strategy steps"),
    (dict(stop_at_exact_match=0.9, eval_strategy="steps"), r"--eval_generation_samples > 0"),
])
def test_stop_at_exact_match_is_refused_where_it_cannot_be_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        demo_args(tmp_path, **overrides)


def test_generation_eval_without_an_answer_column_is_refused_before_training(tmp_path):
    data = demo_data()
    data = DatasetDict({"train": data["train"], "test": data["test"].remove_columns("answer")})
    with pytest.raises(ValueError, match=r"--stop_at_exact_match needs an eval dataset with an `answer` column"):
        demo_trainer(tmp_path, data=data, eval_strategy="steps", eval_steps=2, eval_generation_samples=4,
                     stop_at_exact_match=0.9)
