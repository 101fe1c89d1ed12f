"""TrainingStream: token-budget epochs of different lengths, end to end, in Trainer epochs of one length."""

from __future__ import annotations

import random

import torch
from trainer_helpers import demo_data, demo_trainer, record_collated

from dfactory_hf.data.sampler import TokenBudgetBatchSampler, TrainingStream

_rng = random.Random(0)
LENGTHS = [4 * _rng.randint(1, 16) for _ in range(101)]
WARMUP = dict(max_tokens_per_micro_batch=256, warmup_initial_tokens=64, num_warmup_steps=20)


def plans(rank=0):
    return TokenBudgetBatchSampler(lengths=LENGTHS, data_parallel_rank=rank, data_parallel_size=2, seed=3,
                                   buffer_size=16, micro_batches_per_step=2, **WARMUP)


def epochs_end_to_end(sampler, num_epochs):
    batches = []
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        batches += [[(key.epoch, int(key)) for key in batch] for batch in sampler]
    return batches


def test_the_pieces_are_the_epochs_end_to_end_each_as_long_as_the_first():
    for rank in range(2):
        reference = plans(rank)
        lengths = [reference.num_micro_batches(epoch) for epoch in range(4)]
        assert lengths[0] > lengths[1]  # warmup: epochs differ in length
        stream = TrainingStream(plans(rank))
        pieces = []
        for epoch in (2, 0, 1, 3):  # any order: a piece depends on its number only
            stream.set_epoch(epoch)
            piece = [[(key.epoch, int(key)) for key in batch] for batch in stream]
            assert len(piece) == len(stream) == lengths[0] and len(stream) % 2 == 0
            pieces.append((epoch, piece))
        joined = [batch for _, piece in sorted(pieces) for batch in piece]
        assert joined == epochs_end_to_end(reference, 8)[:4 * lengths[0]]


def _recording_trainer(tmp_path, name, **overrides):
    trainer = demo_trainer(tmp_path / name, data=demo_data(num_train=32, task="add2"), packing=True, max_seq_len=64,
                           max_tokens_per_micro_batch=256, batch_warmup_ratio=0.5, batch_warmup_initial_tokens=64,
                           max_steps=12, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3,
                           learning_rate=1e-2, **overrides)
    seen = record_collated(trainer, lambda features: [(f["epoch"], f["sample_index"]) for f in features])
    return trainer, seen


def test_a_run_across_epochs_of_other_lengths_trains_them_end_to_end_and_resumes_exactly(tmp_path):
    straight, trained = _recording_trainer(tmp_path, "straight")
    straight.train()
    sampler = straight._train_batch_sampler
    steps = [sampler.num_micro_batches(epoch) // 2 for epoch in range(3)]
    assert steps[0] > steps[1] and steps[0] + steps[1] < 12 < sum(steps)  # ends in the third epoch, the shorter ones
    sample_index = straight.train_dataset["sample_index"]
    expected = [[(epoch, sample_index[index]) for epoch, index in batch] for batch in epochs_end_to_end(sampler, 3)]
    assert trained[:24] == expected[:24] and straight.state.global_step == 12

    # Checkpoint 9 lies in the second data epoch (and Trainer's second epoch): the resumed run trains steps 10-12.
    resumed, resumed_batches = _recording_trainer(tmp_path, "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-9"))
    assert resumed_batches[:6] == trained[18:24]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
