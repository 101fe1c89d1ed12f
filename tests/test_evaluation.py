"""Held-out evaluation through the trainer's public surface: the ELBO grid's dataloader and forward, generation
accuracy scored by the callable the caller passes.

    python -m pytest -q tests/test_evaluation.py
"""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import demo_data, demo_trainer

from dfactory_hf.data.sampler import ReplicaEvalBatchSampler
from dfactory_hf.demo.arithmetic import exact_match
from dfactory_hf.trainer.evaluation import evaluate_elbo, generate_answers


def test_elbo_grid_batches_come_from_the_eval_dataloader(tmp_path):
    data = demo_data(num_test=11)
    trainer = demo_trainer(tmp_path, data=data, eval_mask_rates=[0.5, 1.0], per_device_eval_batch_size=4,
                           edit_noise_rate=0.2, edit_keep_weight=0.1)
    metrics = evaluate_elbo(trainer, trainer.eval_dataset)
    ce_sum = supervised = 0.0
    for rate in (0.5, 1.0):
        loader = trainer.get_eval_dataloader(trainer.eval_dataset, mask_rate=rate)
        assert ReplicaEvalBatchSampler.of(loader).num_real_batches == len(loader) == 3  # 11 documents, 4 a batch
        rate_sum = rate_tokens = 0.0
        for batch in loader:
            real = batch["attention_mask"].bool()
            assert torch.all(batch["mask_rate"][real] == rate)
            assert set(batch["noise_kind"].unique().tolist()) <= {0, 1}  # masking only: no edits, nothing kept
            with torch.no_grad():
                step = trainer.diffusion_step(trainer.model, batch)
            rate_sum += float(step.loss.ce_sum)
            rate_tokens += step.loss.num_tokens
        assert metrics[f"eval_loss_t{rate:g}"] == pytest.approx(rate_sum / rate_tokens, rel=1e-6)
        ce_sum += rate_sum / rate
        supervised += rate_tokens
    response = sum(n - p for n, p in zip(trainer.eval_dataset["num_tokens"], trainer.eval_dataset["prompt_length"]))
    assert metrics["eval_elbo_nll"] == pytest.approx(ce_sum / 2 / response, rel=1e-6)
    # At t = 1 every response token is masked: the supervised count is the response-token count.
    assert rate_tokens == response


def test_elbo_grid_leaves_the_global_generator_alone(tmp_path):
    trainer = demo_trainer(tmp_path, eval_mask_rates=[0.3, 0.7])
    state = torch.random.get_rng_state()
    evaluate_elbo(trainer, trainer.eval_dataset)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_generation_accuracy_is_the_scorers_verdict(tmp_path):
    calls = []

    def first_two_right(text: str, answer: str) -> bool:
        calls.append((text, answer))
        return len(calls) <= 2

    trainer = demo_trainer(tmp_path, answer_scorer=first_two_right, eval_generation_samples=5, eval_gen_length=8)
    metrics = trainer.evaluate()
    assert metrics["eval_generated_samples"] == 5 and metrics["eval_exact_match"] == pytest.approx(2 / 5)
    assert [answer for _, answer in calls] == [str(a) for a in trainer.eval_dataset["answer"][:5]]
    # The same generations, scored by the demo's extraction of "The answer is N.".
    model = trainer.accelerator.unwrap_model(trainer.model)
    records = generate_answers(model, trainer.processing_class, trainer.eval_dataset, score=exact_match,
                               num_samples=5, gen_length=8, block_length=4, threshold=0.9,
                               mask_token_id=trainer.mask_token_id)
    assert [record["completion"] for record in records] == [text for text, _ in calls]
    assert [record["correct"] for record in records] == [exact_match(t, a) for t, a in calls]


def test_generation_evaluation_needs_a_scorer(tmp_path):
    with pytest.raises(ValueError) as error:
        demo_trainer(tmp_path, eval_generation_samples=4)
    assert "--eval_generation_samples (4) scores generated answers" in str(error.value)
    assert "answer_scorer=" in str(error.value) and "dfactory_hf.demo.arithmetic.exact_match" in str(error.value)
    with pytest.raises(ValueError, match=r"answer_scorer \('exact'\) must be a callable"):
        demo_trainer(tmp_path, answer_scorer="exact")

