"""The training FLOP count (trainer/flops.py) against a literal count: torch's FlopCounterMode on an eager forward
and backward (every matmul counted as it runs), the allowed mask entries counted on the mask itself, and the
logged total against the per-batch sum."""

from __future__ import annotations

import pytest
import torch
from model_helpers import tiny_model
from torch.utils.flop_counter import FlopCounterMode
from trainer_helpers import demo_trainer

from dfactory_hf.data.collators import PackingCollator
from dfactory_hf.diffusion.masks import build_attention_mask
from dfactory_hf.trainer.flops import attention_pairs, batch_training_flops, document_lengths, training_flops


@pytest.mark.parametrize("num_logits", [1, 7, 48])
def test_step_flops_equal_the_matmuls_an_eager_forward_and_backward_runs(num_logits):
    # Eager attention and eager experts: every matmul is an aten op FlopCounterMode sees. The dense eager
    # attention computes every (query, key) pair, so the literal pair count here is positions^2 per row.
    model = tiny_model(seed=0, attn_implementation="eager")
    model.set_experts_implementation("eager")
    batch, positions = 2, 24
    ids = torch.randint(3, 100, (batch, positions), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(batch * positions, dtype=torch.bool)
    keep[torch.randperm(batch * positions, generator=torch.Generator().manual_seed(1))[:num_logits]] = True
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, logits_to_keep=keep.view(batch, positions)).logits.sum().backward()
    expected = training_flops(model.config, num_positions=batch * positions,
                              num_attention_pairs=batch * positions * positions, num_logits=num_logits)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("block_diffusion", [True, False])
def test_attention_pairs_equal_the_allowed_entries_of_the_mask(block_diffusion):
    # A packed batch: documents of 8, 12, 4 and 16 tokens in rows of 24 (row padding included).
    features = [{"input_ids": list(range(3, 3 + n)), "prompt_length": 2, "sample_index": i}
                for i, n in enumerate([8, 12, 4, 16])]
    batch = PackingCollator(mask_token_id=2, pad_token_id=0, block_size=4, max_seq_len=24)(features)
    lengths = document_lengths(batch["position_ids"], batch["attention_mask"])
    assert sorted(lengths.tolist()) == [4, 8, 12, 16]
    mask = build_attention_mask(batch["position_ids"], batch["attention_mask"], block_size=4,
                                block_diffusion=block_diffusion, attn_implementation="sdpa", dtype=torch.float32)
    real = batch["attention_mask"].bool()
    if block_diffusion:
        real = torch.cat([real, real], dim=1)
    allowed = mask[:, 0] & real[:, :, None] & real[:, None, :]  # real queries and keys only
    assert int(allowed.sum()) == attention_pairs(lengths, block_size=4, block_diffusion=block_diffusion)


def test_logged_flops_are_the_sum_over_micro_batches(tmp_path):
    trainer = demo_trainer(tmp_path, max_steps=2, logging_steps=1, gradient_accumulation_steps=2)
    batches, counted = [], []
    collate = trainer.data_collator

    def recording(features):
        batch = collate(features)
        batches.append(batch)
        return batch

    trainer.data_collator = recording
    original = trainer.floating_point_ops
    trainer.floating_point_ops = lambda inputs: counted.append(original(inputs)) or counted[-1]
    trainer.train()
    config = trainer.model.config
    literal = [batch_training_flops(config, batch, block_size=4, block_diffusion=True,
                                    num_logits=int((batch["labels"] != -100).sum())) for batch in batches[:4]]
    assert counted == literal
    assert trainer.state.total_flos == pytest.approx(sum(literal))
    first_log = trainer.state.log_history[0]
    assert first_log["tflops_per_device"] > 0 and "mfu" not in first_log  # no known peak on CPU
