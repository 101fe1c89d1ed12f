"""Packed block-diffusion training: packed == unpacked, documents isolated, token-budget batches in Trainer."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import demo_args, demo_data, demo_model, demo_trainer, record_collated

from dfactory_hf.data.collators import PackingCollator, PaddingCollator
from dfactory_hf.data.sampler import TokenBudgetBatchSampler
from dfactory_hf.trainer.forward import DiffusionObjective, diffusion_step, model_inputs

COMMON = dict(mask_token_id=2, pad_token_id=0, block_size=4, seed=7)


def _loss_and_grads(model, batch, objective, attn="sdpa"):
    model.zero_grad()
    step = diffusion_step(model, batch, objective, attn_implementation=attn)
    step.loss.loss.backward()
    return step.loss.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block_diffusion", [True, False])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(tmp_path, block_diffusion):
    trainer = demo_trainer(tmp_path, data=demo_data(num_train=16, task="mixed"), max_seq_len=1024)
    features = [trainer.train_dataset[i] for i in range(6)]
    assert len({f["num_tokens"] for f in features}) > 2
    padded = PaddingCollator(**COMMON)(features)
    packed = PackingCollator(**COMMON, max_seq_len=512)(features)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # documents really share rows
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    objective = DiffusionObjective(block_size=4, block_diffusion=block_diffusion)
    model = demo_model(seed=1).train()
    loss_padded, grads_padded = _loss_and_grads(model, padded, objective)
    loss_packed, grads_packed = _loss_and_grads(model, packed, objective)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    assert grads_padded.keys() == grads_packed.keys()
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("block_diffusion", [True, False])
def test_perturbing_one_document_changes_no_logit_of_another(attn, block_diffusion):
    torch.manual_seed(0)
    lengths = [8, 12, 4, 16]
    features = [
        {"input_ids": torch.randint(8, 100, (n,)).tolist(), "prompt_length": 2, "sample_index": i}
        for i, n in enumerate(lengths)
    ]
    batch = PackingCollator(**COMMON, max_seq_len=48)(features)
    assert batch["input_ids"].shape[0] == 1  # all four documents in one row (40 tokens + 8 padding)
    perturbed = {k: v.clone() for k, v in batch.items()}
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    victim = slice(starts[1], starts[2])  # the second document in the row
    perturbed["input_ids"][0, victim] = (perturbed["input_ids"][0, victim] + 5) % 100
    perturbed["noisy_input_ids"][0, victim] = (perturbed["noisy_input_ids"][0, victim] + 5) % 100
    model = demo_model(attn_implementation=attn).eval()
    objective = DiffusionObjective(block_size=4, block_diffusion=block_diffusion)
    outputs = []
    for b in (batch, perturbed):
        kwargs = model_inputs(b, objective, attn_implementation=attn, mask_dtype=torch.float32,
                              selector=torch.ones_like(b["labels"], dtype=torch.bool))
        kwargs["logits_to_keep"] = 0
        with torch.no_grad():
            outputs.append(model(**kwargs).logits[0])
    length = batch["input_ids"].shape[1]
    others = torch.ones(length, dtype=torch.bool)
    others[victim] = False
    others &= batch["attention_mask"][0].bool()
    if block_diffusion:
        others = torch.cat([others, others])
    torch.testing.assert_close(outputs[1][others], outputs[0][others], atol=1e-5, rtol=0)
    assert (outputs[1][~others] - outputs[0][~others]).abs().max() > 1e-4  # the victim itself did change


def test_packed_training_through_trainer_uses_the_token_budget(tmp_path):
    data = demo_data(num_train=96, task="mixed")
    trainer = demo_trainer(tmp_path, data=data, packing=True, max_seq_len=512, max_tokens_per_micro_batch=1024,
                           max_steps=3, logging_steps=3)
    loader = trainer.get_train_dataloader()
    sampler = trainer._train_batch_sampler
    assert isinstance(sampler, TokenBudgetBatchSampler)
    lengths = trainer.train_dataset["num_tokens"]
    for micro_batch in list(sampler)[:10]:
        assert sum(lengths[i] for i in micro_batch) <= 1024
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] <= 512 and batch["attention_mask"].float().mean() > 0.5
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert logged["padding_fraction"] < 0.5


def _trained_parameters(tmp_path, name, **overrides):
    trainer = demo_trainer(tmp_path / name, data=demo_data(num_train=64, task="add2"), packing=True,
                           max_seq_len=64, max_tokens_per_micro_batch=256, learning_rate=1e-2, **overrides)
    seen = record_collated(trainer, lambda features: [f["sample_index"] for f in features])
    return trainer, seen


def test_mid_epoch_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps = dict(max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
    straight, straight_batches = _trained_parameters(tmp_path, "straight", **steps)
    straight.train()
    resumed, resumed_batches = _trained_parameters(tmp_path, "resumed", **steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-3"))
    # The resumed run trains on exactly the micro-batches of steps 4-6 of the uninterrupted run (both runs
    # also collate one batch beyond the last step: Trainer fetches it before noticing max_steps)...
    assert resumed_batches[:6] == straight_batches[6:12]
    # ...and ends with the same parameters.
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    state = json.loads((tmp_path / "straight" / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_token_budget_below_max_seq_len_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch \(32\) must be >= max_seq_len \(64\)"):
        demo_args(tmp_path, packing=True, max_tokens_per_micro_batch=32)
