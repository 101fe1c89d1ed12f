"""`--stop_at_exact_match`: training stops at the first evaluation whose generated exact match reaches the target,
and the flag is refused where it could never be checked."""

from __future__ import annotations

import pytest
from datasets import DatasetDict

from dfactory_hf.demo.arithmetic import exact_match
from trainer_helpers import demo_args, demo_data, demo_trainer


def test_training_stops_at_the_first_evaluation_that_reaches_the_target(tmp_path):
    # The scorer calls an answer right from step 6 on, so the evaluations at steps 2 and 4 score 0 and the one at
    # step 6 scores 1: training must stop there, far below max_steps, with the schedule still that of max_steps.
    holder = {}
    trainer = demo_trainer(tmp_path, answer_scorer=lambda text, answer: holder["trainer"].state.global_step >= 6,
                           max_steps=40, eval_strategy="steps", eval_steps=2, eval_generation_samples=2,
                           eval_gen_length=8, stop_at_exact_match=1.0)
    holder["trainer"] = trainer
    trainer.train()
    scores = [(entry["step"], entry["eval_exact_match"]) for entry in trainer.state.log_history
              if "eval_exact_match" in entry]
    assert scores == [(2, 0.0), (4, 0.0), (6, 1.0)]
    assert trainer.state.global_step == 6 and trainer.state.max_steps == 40


@pytest.mark.parametrize("overrides, message", [
    (dict(stop_at_exact_match=1.5, eval_strategy="steps", eval_generation_samples=4),
     r"--stop_at_exact_match \(1.5\) must be in \(0, 1\], e.g. 0.95; 0 trains for max_steps"),
    (dict(stop_at_exact_match=0.9, eval_generation_samples=4), r"set --eval_strategy steps"),
    (dict(stop_at_exact_match=0.9, eval_strategy="steps"), r"--eval_generation_samples > 0"),
])
def test_stop_at_exact_match_is_refused_where_it_cannot_be_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        demo_args(tmp_path, **overrides)


def test_generation_eval_without_an_answer_column_is_refused_before_training(tmp_path):
    data = demo_data()
    data = DatasetDict({"train": data["train"], "test": data["test"].remove_columns("answer")})
    with pytest.raises(ValueError, match=r"--stop_at_exact_match needs an eval dataset with an `answer` column.*"
                                         r"pass --stop_at_exact_match 0 --eval_generation_samples 0"):
        demo_trainer(tmp_path, data=data, eval_strategy="steps", eval_steps=2, eval_generation_samples=4,
                     stop_at_exact_match=0.9, answer_scorer=exact_match)
