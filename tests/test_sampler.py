"""TokenBudgetBatchSampler: coverage across simulated data-parallel ranks, budgets, warmup, resume, errors."""

import json
import random
import re

import pytest
import torch
from accelerate import skip_first_batches
from accelerate.data_loader import SkipBatchSampler
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import BatchRebalanceSampler

from dfactory_hf.data.collators import PackingCollator
from dfactory_hf.data.sampler import TokenBudgetBatchSampler

_rng = random.Random(0)
LENGTHS = [4 * _rng.randint(1, 16) for _ in range(101)]  # block-aligned (block_size 4), 4..64 tokens
WARMUP = dict(max_tokens_per_micro_batch=256, warmup_initial_tokens=64, num_warmup_steps=20)


def make(rank=0, size=1, **overrides):
    kwargs = dict(lengths=LENGTHS, max_tokens_per_micro_batch=128, data_parallel_rank=rank,
                  data_parallel_size=size, seed=3, buffer_size=16)
    kwargs.update(overrides)
    return TokenBudgetBatchSampler(**kwargs)


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def rows_in_order(batch, lengths=LENGTHS, row_length=64):
    """Rows a collator filling rows of `row_length` in the given order builds (the PackingCollator does)."""
    rows, room = 0, 0
    for i in batch:
        if lengths[i] > room:
            rows, room = rows + 1, row_length
        room -= lengths[i]
    return rows


def cost(batch, lengths=LENGTHS, layout="tokens"):
    if layout == "padded":
        return len(batch) * max(lengths[i] for i in batch)
    if layout == "rows":
        return rows_in_order(batch, lengths) * 64
    return sum(lengths[i] for i in batch)


LAYOUTS = {"tokens": {}, "padded": dict(padded=True), "rows": dict(row_length=64)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("micro_batches_per_step", [1, 2])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_ranks_cover_every_index_once_with_equal_counts_within_budget(size, micro_batches_per_step, layout):
    samplers = [make(rank, size, micro_batches_per_step=micro_batches_per_step, **LAYOUTS[layout])
                for rank in range(size)]
    per_rank = [epoch_batches(sampler, 1) for sampler in samplers]
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1 and counts.pop() % micro_batches_per_step == 0
    assert all(len(sampler) == len(batches) for sampler, batches in zip(samplers, per_rank))
    every_index = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert every_index == list(range(len(LENGTHS)))
    assert all(cost(batch, layout=layout) <= 128 for batches in per_rank for batch in batches)
    if layout == "padded":  # the budget binds on the padded cost: more, smaller micro-batches than packing
        assert len(samplers[0]) > len(make(0, size, micro_batches_per_step=micro_batches_per_step))


def test_planned_rows_are_what_the_packing_collator_builds_and_nearly_full():
    # Two length modes, as in chat SFT data: short answers and long word problems (block-aligned, block 32).
    rng = random.Random(1)
    lengths = [32 * rng.choice([2, 2, 2, 3, 4, 6, 7, 7, 8, 9]) for _ in range(2000)]
    collator = PackingCollator(mask_token_id=2, pad_token_id=0, block_size=32, seed=0, max_seq_len=512)
    padding = {}
    for layout in ("tokens", "rows"):
        sampler = make(lengths=lengths, max_tokens_per_micro_batch=4096, buffer_size=512,
                       **({"row_length": 512} if layout == "rows" else {}))
        row_tokens = real = 0
        for batch in list(sampler)[:40]:
            features = [dict(input_ids=[7] * lengths[i], prompt_length=1, sample_index=i) for i in batch]
            collated = collator(features)
            assert collated["input_ids"].numel() <= 4096 or layout == "tokens"
            if layout == "rows":
                assert collated["input_ids"].shape[0] <= rows_in_order(batch, lengths, 512) <= 8
            row_tokens += collated["input_ids"].numel()
            real += int(collated["attention_mask"].sum())
        padding[layout] = 1 - real / row_tokens
    assert padding["rows"] < 0.03 < padding["tokens"]


def test_count_is_made_divisible_by_splitting_the_costliest_micro_batch():
    lengths = [10] * 5  # all five fit one micro-batch of 50 tokens; two ranks need two
    halves = [epoch_batches(make(rank, 2, lengths=lengths, max_tokens_per_micro_batch=50), 0) for rank in range(2)]
    assert sorted(len(batches[0]) for batches in halves) == [2, 3]
    assert sorted(halves[0][0] + halves[1][0]) == list(range(5))


def test_drop_last_drops_and_counts_only_when_splitting_cannot_reach_a_multiple():
    lengths = [32] * 7  # one document per micro-batch: 7 micro-batches cannot be dealt to 2 ranks
    with pytest.raises(ValueError, match=re.escape(
            "epoch 0: the 7 documents pack into 7 micro-batches, and even one document per micro-batch cannot "
            "make a multiple of data_parallel_size * micro_batches_per_step = 2; pass drop_last=True to drop "
            "the last 1 micro-batches")):
        len(make(0, 2, lengths=lengths, max_tokens_per_micro_batch=32))
    samplers = [make(rank, 2, lengths=lengths, max_tokens_per_micro_batch=32, drop_last=True) for rank in range(2)]
    kept = [i for sampler in samplers for batch in epoch_batches(sampler, 0) for i in batch]
    assert len(samplers[0]) == len(samplers[1]) == 3
    assert len(kept) == len(set(kept)) == 6
    assert samplers[0].num_dropped_samples(0) == 1


def test_warmup_budget_ramps_linearly_over_optimizer_steps_across_epochs():
    sampler = make(0, 2, micro_batches_per_step=2, **WARMUP)
    assert [sampler.budget_at_step(s) for s in (0, 1, 10, 19, 20, 500)] == [64, 73, 160, 246, 256, 256]
    steps_done = 0
    for epoch in range(3):  # epoch 0 alone is shorter than 20 steps: warmup continues into epoch 1
        for rank in range(2):
            batches = epoch_batches(make(rank, 2, micro_batches_per_step=2, **WARMUP), epoch)
            assert all(cost(b) <= sampler.budget_at_step(steps_done + j // 2) for j, b in enumerate(batches))
            first_step_costs = [cost(b) for b in batches[:2]]
            if epoch > 0:  # the ramp continues where the previous epoch left it; it does not restart
                assert max(first_step_costs) > sampler.budget_at_step(0)
        steps_done += sampler.num_micro_batches(epoch) // 2
    assert sampler.num_micro_batches(0) // 2 < 20 < steps_done
    assert sampler.num_micro_batches(0) > make(0, 2, micro_batches_per_step=2, max_tokens_per_micro_batch=256).__len__()


def test_order_depends_on_the_epoch_and_nothing_else():
    sampler = make(0, 2)
    epoch0, epoch1 = epoch_batches(sampler, 0), epoch_batches(sampler, 1)
    assert epoch0 != epoch1 and sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))
    assert epoch_batches(sampler, 0) == epoch0 == epoch_batches(make(0, 2), 0)
    warmed = epoch_batches(make(0, 2, **WARMUP), 1)
    other = make(0, 2, **WARMUP)
    other.num_micro_batches(3)  # planning other epochs first has no side effect
    assert epoch_batches(other, 1) == warmed
    assert epoch_batches(make(shuffle=False), 0) == epoch_batches(make(shuffle=False), 1)


@pytest.mark.parametrize("layout", ["tokens", "rows"])
@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("rank", [0, 1])
def test_state_dict_resume_yields_the_remainder_then_the_next_epoch(rank, epoch, layout):
    kwargs = dict(micro_batches_per_step=2, **WARMUP, **LAYOUTS[layout])
    reference = make(rank, 2, **kwargs)
    full, following = epoch_batches(reference, epoch), epoch_batches(reference, epoch + 1)
    interrupted = make(rank, 2, **kwargs)
    interrupted.set_epoch(epoch)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(5)]
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["epoch"] == epoch and state["num_micro_batches_yielded"] == 5

    resumed = make(rank, 2, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    resumed.set_epoch(epoch)  # a loop calling set_epoch at every epoch start keeps the loaded position
    assert consumed + list(resumed) == full
    assert epoch_batches(resumed, epoch + 1) == following
    by_hand = make(rank, 2, **kwargs)  # the count the model consumed, as a caller behind a DataLoader saves it
    by_hand.load_state_dict({"epoch": epoch, "num_micro_batches_yielded": 5})
    assert list(by_hand) == full[5:]


def test_load_state_dict_refuses_a_state_from_another_configuration():
    state = make(**WARMUP).state_dict() | {"num_micro_batches_yielded": 10_000}
    with pytest.raises(ValueError, match=re.escape("`num_micro_batches_yielded` (10000) must be in [0, ")):
        make(**WARMUP).load_state_dict(state)


def test_trainer_resume_path_set_epoch_then_skip_first_batches_gives_the_remainder():
    full = epoch_batches(make(1, 2, **WARMUP), 1)
    sampler = make(1, 2, **WARMUP)  # fresh process: Trainer wraps first, the trainer then sets the epoch
    loader = skip_first_batches(DataLoader(range(len(LENGTHS)), batch_sampler=sampler, collate_fn=list), 4)
    assert isinstance(loader.batch_sampler, SkipBatchSampler) and loader.batch_sampler.batch_sampler is sampler
    sampler.set_epoch(1)
    assert len(loader) == len(full) - 4
    assert [batch for batch in loader] == full[4:]


def test_locate_micro_batch_maps_a_global_count_to_epoch_and_offset():
    sampler = make(0, 2, micro_batches_per_step=2, **WARMUP)
    first, second = sampler.num_micro_batches(0), sampler.num_micro_batches(1)
    assert sampler.locate_micro_batch(0) == (0, 0)
    assert sampler.locate_micro_batch(first - 1) == (0, first - 1)
    assert sampler.locate_micro_batch(first) == (1, 0)
    assert sampler.locate_micro_batch(first + second + 3) == (2, 3)


def test_trainer_takes_the_batch_sampler_path(tmp_path):
    from transformers import Trainer, TrainingArguments

    sampler = make()
    assert isinstance(sampler, BatchRebalanceSampler)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, data_collator=lambda rows: [r["index"] for r in rows])
    rows = [{"index": i} for i in range(len(LENGTHS))]
    loader = trainer._get_dataloader(rows, "Training", 1, sampler_fn=lambda _: sampler, is_training=True)
    assert [batch for batch in loader] == epoch_batches(make(), 0)


@pytest.mark.parametrize("overrides, message", [
    (dict(lengths=[8, 40, 16], max_tokens_per_micro_batch=30),
     "`max_tokens_per_micro_batch` (30) is below the longest document (index 1, 40 tokens); raise "
     "max_tokens_per_micro_batch to at least 40 or filter/truncate documents longer than 30 tokens"),
    (dict(lengths=[]), "`lengths` is empty: the sampler needs at least one document"),
    (dict(lengths=[8, 0]), "`lengths[1]` (0) must be positive; filter out empty documents"),
    (dict(data_parallel_rank=2, data_parallel_size=2),
     "`data_parallel_rank` (2) must be in [0, data_parallel_size=2); pass this process's index along the "
     "data-parallel mesh axis, not its global rank"),
    (dict(buffer_size=0), "`buffer_size` (0) must be a positive integer; pass a value >= 1"),
    (dict(micro_batches_per_step=0), "`micro_batches_per_step` (0) must be a positive integer"),
    (dict(max_tokens_per_micro_batch=-1), "`max_tokens_per_micro_batch` (-1) must be a positive integer"),
    (dict(lengths=[8, 8, 8], data_parallel_size=2, micro_batches_per_step=2),
     "`lengths` has 3 documents but every optimizer step needs data_parallel_size * micro_batches_per_step "
     "= 4 micro-batches of at least one document"),
    (dict(num_warmup_steps=-1), "`num_warmup_steps` (-1) must be a non-negative integer"),
    (dict(num_warmup_steps=5), "`warmup_initial_tokens` (None) and `num_warmup_steps` (5) go together"),
    (dict(warmup_initial_tokens=64), "`warmup_initial_tokens` (64) and `num_warmup_steps` (0) go together"),
    (dict(lengths=[8, 40], warmup_initial_tokens=32, num_warmup_steps=5),
     "`warmup_initial_tokens` (32) must be between the longest document (index 1, 40 tokens) and "
     "max_tokens_per_micro_batch (128); raise it, or filter/truncate documents longer than 32 tokens"),
    (dict(warmup_initial_tokens=512, num_warmup_steps=5), "`warmup_initial_tokens` (512) must be between"),
    (dict(row_length=64, padded=True), "`row_length` packs documents into rows and `padded=True` gives each its own"),
    (dict(row_length=32), "`row_length` (32) must be an integer >= the longest document (64 tokens); pass max_seq_len"),
    (dict(row_length=96, max_tokens_per_micro_batch=128, warmup_initial_tokens=64, num_warmup_steps=3),
     "the token budget (64) holds no row of row_length=96 tokens; raise max_tokens_per_micro_batch (and "
     "warmup_initial_tokens) to at least 96"),
])
def test_invalid_arguments_raise_with_the_rule_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**overrides)


@pytest.mark.parametrize("num_items,batch_size,ranks", [(9, 4, 2), (16, 4, 2), (5, 2, 4), (3, 4, 4), (0, 2, 2)])
def test_replica_eval_batches_cover_each_item_once_in_lockstep(num_items, batch_size, ranks):
    from dfactory_hf.data.sampler import ReplicaEvalBatchSampler

    samplers = [ReplicaEvalBatchSampler(num_items=num_items, batch_size=batch_size, data_parallel_rank=r,
                                        data_parallel_size=ranks) for r in range(ranks)]
    assert len({len(s) for s in samplers}) == 1  # the same number of batches on every rank
    counted = [i for s in samplers for batch in list(s)[: s.num_real_batches] for i in batch]
    assert sorted(counted) == list(range(num_items))  # every item once, fillers excluded
    for s in samplers:
        assert all(len(batch) <= batch_size for batch in s) and all(batch for batch in s)
