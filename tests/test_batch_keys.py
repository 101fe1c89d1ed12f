"""Batch items carry their epoch (and planned row): an unchanging collator, persistent DataLoader workers allowed."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from trainer_helpers import demo_data, demo_trainer, record_collated

from dfactory_hf.data.keys import DocumentKey, KeyedDataset

MODES = {"padded": {}, "packing": dict(packing=True, max_tokens_per_micro_batch=256)}


def _losses(tmp_path, mode, **overrides):
    trainer = demo_trainer(tmp_path, data=demo_data(num_train=24, task="add2"), max_steps=-1, num_train_epochs=3,
                           logging_steps=1, **MODES[mode], **overrides)
    collator = dict(vars(trainer.data_collator))
    trainer.train()
    assert vars(trainer.data_collator) == collator  # nothing pushed into the collator during training
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer


@pytest.mark.parametrize("mode", list(MODES))
def test_persistent_workers_train_the_same_losses_as_the_main_process(tmp_path, mode):
    in_process, trainer = _losses(tmp_path / "main", mode)
    persistent, _ = _losses(tmp_path / "workers", mode, dataloader_num_workers=1,
                            dataloader_persistent_workers=True)
    assert trainer.state.epoch == pytest.approx(3.0) and len(in_process) == trainer.state.global_step > 3
    assert persistent == in_process


@pytest.mark.parametrize("mode", list(MODES))
def test_every_epoch_draws_the_noise_of_the_seeding_formula(tmp_path, mode):
    # The features training batches are made of carry their epoch; a collator given that epoch by hand (the formula of
    # collators.py: seed, epoch, sample_index) draws the same noise for them, and the epochs draw different noise.
    trainer = demo_trainer(tmp_path, data=demo_data(num_train=24, task="add2"), max_steps=-1, num_train_epochs=2,
                           **MODES[mode])
    batches = record_collated(trainer)
    trainer.train()
    seen = [feature for batch in batches for feature in batch]
    assert [feature["epoch"] for feature in seen] == sorted(feature["epoch"] for feature in seen)
    assert {feature["epoch"] for feature in seen} == {0, 1}
    assert all(("row" in feature) == (mode == "packing") for feature in seen)
    by_epoch = {}
    for feature in seen:
        plain = {key: value for key, value in feature.items() if key not in ("epoch", "row")}
        reference = dataclasses.replace(trainer.data_collator, epoch=feature["epoch"])
        (drawn,), (expected,) = trainer.data_collator.noise(feature), reference.noise(plain)
        assert torch.equal(drawn.x_t, expected.x_t) and drawn.mask_rate == expected.mask_rate
        by_epoch.setdefault(feature["sample_index"], {})[feature["epoch"]] = drawn.x_t
    assert any(not torch.equal(noise[0], noise[1]) for noise in by_epoch.values() if len(noise) == 2)


def test_keys_survive_the_trip_to_a_worker_and_reach_the_feature():
    key = pickle.loads(pickle.dumps(DocumentKey(5, epoch=2, row=1)))
    assert (key, key.epoch, key.row, [10, 11, 12, 13, 14, 15][key]) == (5, 2, 1, 15)
    dataset = KeyedDataset([{"sample_index": i} for i in range(6)])
    assert dataset.__getitems__([key, 3]) == [{"sample_index": 5, "epoch": 2, "row": 1}, {"sample_index": 3}]


def test_the_supervised_positions_are_found_once_per_micro_batch(tmp_path, monkeypatch):
    import dfactory_hf.trainer.forward as forward

    calls = []

    def counting(labels, **kwargs):
        calls.append(labels.shape)
        return gather(labels, **kwargs)

    gather = forward.gather_supervised
    monkeypatch.setattr(forward, "gather_supervised", counting)
    trainer = demo_trainer(tmp_path, data=demo_data(num_train=24, task="add2"), max_steps=3,
                           gradient_accumulation_steps=2, **MODES["packing"])
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.total_flos > 0
    assert len(calls) == 3 * 2  # the count of the step, the loss and the FLOPs share one selector


def test_persistent_workers_without_workers_are_refused_at_parsing(tmp_path):
    from trainer_helpers import demo_args

    with pytest.raises(ValueError, match=r"--dataloader_persistent_workers .* needs --dataloader_num_workers > 0 "
                                         r"\(it is 0\)"):
        demo_args(tmp_path, dataloader_persistent_workers=True)
    assert demo_args(tmp_path, dataloader_persistent_workers=True, dataloader_num_workers=1).dataloader_persistent_workers


def test_the_packing_collator_lays_out_the_planned_rows_and_refuses_rows_too_long():
    from dfactory_hf.data.collators import PackingCollator

    features = [dict(input_ids=[7] * n, prompt_length=1, sample_index=i, row=row)
                for i, (n, row) in enumerate([(8, 1), (4, 0), (4, 1), (8, 0)])]
    batch = PackingCollator(mask_token_id=2, pad_token_id=0, block_size=4, max_seq_len=16)(features)
    assert batch["attention_mask"].sum(1).tolist() == [12, 12]  # as planned: [4, 8] and [8, 4], not best fit
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match=r"^The planned row 0 holds 12 tokens, not 1 to max_seq_len=8"):
        PackingCollator(mask_token_id=2, pad_token_id=0, block_size=4, max_seq_len=8)(features)
