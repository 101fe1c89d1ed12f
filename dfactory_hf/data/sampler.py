"""Token-budget batch sampler: variable-size micro-batches, the same number on every data-parallel rank.

Usage (the trainer returns it from `_get_train_sampler`; because it is a `BatchRebalanceSampler`,
Trainer's `_get_dataloader` passes it as the DataLoader's `batch_sampler` and turns accelerate's
re-sharding into a pass-through)::

    sampler = TokenBudgetBatchSampler(
        lengths=[len(ids) for ids in dataset["input_ids"]], max_tokens_per_micro_batch=8192,
        data_parallel_rank=dp_rank, data_parallel_size=dp_size, seed=args.seed, buffer_size=512,
        micro_batches_per_step=args.gradient_accumulation_steps)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        for micro_batch in sampler:  # list of dataset indices, cost <= the step's token budget
            ...

The indices are `DocumentKey`s (data/keys.py): ints that also carry the epoch (the collator's noise seed) and, with
`row_length`, the row of the micro-batch each document goes into, so the packing collator only lays the rows out.

Every rank builds the same global plan of an epoch, without communication, then keeps its share:

1. a permutation of all indices seeded by `seed + epoch` (identity when `shuffle=False`);
2. each consecutive chunk of `buffer_size` samples is packed best-fit, longest first: a sample goes
   into the open micro-batch it fits with the least room left, else opens a new one; the chunk's
   micro-batches are closed when the chunk is done. The cost of a micro-batch is the sum of its
   lengths (one packed row, `padding_free`), or `num_samples * longest` with `padded=True`.
   With `row_length` (packing into rows of max_seq_len) the chunk's documents are packed best-fit,
   longest first, into rows of `row_length`, and consecutive rows form micro-batches of
   `budget // row_length` rows, indices listed row by row: the budget then bounds the rows the
   collator builds (rows x row_length), not just the document tokens, and rows come out nearly full
   (the benchmark's `mixed` data, 4,000 documents, budget 8 x max_seq_len: micro-batches planned on
   document tokens alone and re-packed by the collator held 9.6% row padding at max_seq_len 512 and
   6.8% at 1024; rows planned here, 0.7% and 0.4%, with the same number of micro-batches). A micro-batch's
   rows are its documents filled in order (`next_fit`), or best fit where that needs fewer rows (after a split,
   step 3), and it is yielded row by row with each key's row;
3. the count is raised to a multiple of K = `data_parallel_size * micro_batches_per_step` by splitting
   the costliest multi-document micro-batches in two. Only when there are too few documents for that
   does `drop_last=True` drop the last `count % K` micro-batches (else `ValueError`);
4. every K consecutive micro-batches form one optimizer step; sorted by cost, they are cut into bands of
   `data_parallel_size`, band j giving every rank its j-th micro-batch (dealt in alternating direction),
   so micro-batches that run at the same time cost alike and per-rank totals even out.

Trade-offs (100k documents, log-normal lengths with median 256 tokens, budget 8192; from
`python -m dfactory_hf.data.sampler`): the fill ratio (tokens / budget) is 0.67 with `buffer_size=16`,
0.92 with 128, 0.98 with 512 and 0.995 with 2048, so the buffer should hold many budgets' worth of
tokens; a larger buffer also groups long documents at the start of each chunk. A plan takes 0.1-0.3 s
per epoch on every rank. Epochs differ in length (packing depends on the permutation, and on warmup).

Batch-size warmup runs over optimizer steps counted from the start of training: step s has the budget
`warmup_initial_tokens + (max_tokens_per_micro_batch - warmup_initial_tokens) * s // num_warmup_steps`
while s < num_warmup_steps, then `max_tokens_per_micro_batch`. A micro-batch's step follows from its
position (K per step), and an epoch's first step from the earlier epochs' plans, so iteration is a pure
function of the epoch: no counter that a skipping wrapper could bypass.

Resume: `state_dict()` holds the epoch and the micro-batches yielded in it; a new sampler given it by
`load_state_dict` yields exactly the rest of that epoch (also after `set_epoch` of that same epoch),
then the next epochs as an uninterrupted run. Under a DataLoader the sampler runs ahead of the model
(prefetch): load `{"epoch": e, "num_micro_batches_yielded": n}` with n the count the model consumed.

`transformers.Trainer` (5.23) assumes every epoch as long as the first: for its loop, for the resume position
(`global_step // steps per epoch`, then `skip_first_batches`) and for the number of epochs `max_steps` needs. So the
trainer hands Trainer a `TrainingStream` (`micro_batches_per_step = gradient_accumulation_steps`;
`per_device_train_batch_size` is ignored): this sampler's epochs end to end, cut into Trainer epochs of the first
epoch's count, which makes Trainer's own arithmetic exact, resume included; the stream starts each piece through
`locate_micro_batch` and `load_state_dict`, the one resume path. A Trainer epoch is then that many micro-batches, not
one pass over the data: logged `epoch` values and `*_strategy="epoch"` follow the pieces, the noise follows the
data epoch each key carries.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import BatchRebalanceSampler

from .keys import DocumentKey
from .packing import best_fit, fewest_rows, next_fit

logger = logging.getLogger(__name__)

# A micro-batch while planning: (dataset indices, sum of their lengths, longest length).
_MicroBatch = tuple[list[int], int, int]


class TokenBudgetBatchSampler(BatchRebalanceSampler):
    """This data-parallel rank's micro-batches (lists of dataset indices) under a token budget.

    Ranks of one sequence-parallel group pass the same `data_parallel_rank` and get identical batches.
    """

    def __init__(
        self,
        *,
        lengths: Sequence[int],
        max_tokens_per_micro_batch: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        seed: int,
        buffer_size: int,
        shuffle: bool = True,
        micro_batches_per_step: int = 1,
        warmup_initial_tokens: int | None = None,
        num_warmup_steps: int = 0,
        padded: bool = False,
        row_length: int | None = None,
        drop_last: bool = False,
    ):
        lengths = [int(length) for length in lengths]
        _validate(lengths, max_tokens_per_micro_batch, data_parallel_rank, data_parallel_size, buffer_size,
                  micro_batches_per_step, warmup_initial_tokens, num_warmup_steps)
        _validate_row_length(row_length, padded, lengths, max_tokens_per_micro_batch, warmup_initial_tokens)
        # The parent's attributes (lengths, dp_size, grad_accum, rank, seed, shuffle, epoch) keep their
        # meaning; its planning is not used. `effective_batch_size` only has to satisfy its assertion.
        super().__init__(lengths=lengths, effective_batch_size=len(lengths), dp_size=data_parallel_size,
                         grad_accum=micro_batches_per_step, shuffle=shuffle, seed=seed,
                         rank=data_parallel_rank, drop_last=drop_last)
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.buffer_size = buffer_size
        self.warmup_initial_tokens = warmup_initial_tokens
        self.num_warmup_steps = num_warmup_steps
        self.padded = padded
        self.row_length = row_length
        self._num_steps_by_epoch: dict[int, int] = {}
        self._num_dropped_by_epoch: dict[int, int] = {}
        self._cached_plan: tuple[int, list[list[int]]] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, micro-batches to skip) from load_state_dict
        self._num_yielded = 0

    # ---- public API ----
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, or from the loaded position if `load_state_dict` named it."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`epoch` ({epoch!r}) must be a non-negative integer")
        self.epoch = epoch
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self._num_yielded = self._resume[1] if self._resume is not None else 0

    def __len__(self) -> int:
        return self.num_micro_batches(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan(self.epoch)
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        self._num_yielded = start
        for micro_batch in plan[start:]:
            self._num_yielded += 1
            yield self._keys(micro_batch)

    def num_micro_batches(self, epoch: int) -> int:
        """Micro-batches this rank yields in `epoch`: the same on every rank, a multiple of micro_batches_per_step."""
        return self._num_steps(epoch) * self.grad_accum

    def num_dropped_samples(self, epoch: int) -> int:
        """Documents `drop_last` left out of `epoch` on all ranks together (0 unless splitting fell short)."""
        self._num_steps(epoch)
        return self._num_dropped_by_epoch[epoch]

    def budget_at_step(self, step: int) -> int:
        """Token budget of every micro-batch of optimizer step `step` (counted from the start of training)."""
        if step >= self.num_warmup_steps:
            return self.max_tokens_per_micro_batch
        span = self.max_tokens_per_micro_batch - self.warmup_initial_tokens
        return self.warmup_initial_tokens + span * step // self.num_warmup_steps

    def locate_micro_batch(self, num_micro_batches_done: int) -> tuple[int, int]:
        """(epoch, micro-batches done in it) after this rank consumed `num_micro_batches_done` since step 0."""
        epoch = 0
        while num_micro_batches_done >= self.num_micro_batches(epoch):
            num_micro_batches_done -= self.num_micro_batches(epoch)
            epoch += 1
        return epoch, num_micro_batches_done

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "num_micro_batches_yielded": self._num_yielded,
            # Checked on load: a mismatch means lengths, seed or layout changed between save and load.
            "num_warmup_steps_done": min(self._first_step(self.epoch) + self._num_yielded // self.grad_accum,
                                         self.num_warmup_steps),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["num_micro_batches_yielded"])
        self.set_epoch(epoch)
        if not 0 <= done <= len(self):
            raise ValueError(
                f"`num_micro_batches_yielded` ({done}) must be in [0, {len(self)}], the micro-batches of epoch "
                f"{epoch}; the state was saved by a sampler with other lengths, seed or parallel layout")
        expected = min(self._first_step(epoch) + done // self.grad_accum, self.num_warmup_steps)
        if state.get("num_warmup_steps_done", expected) != expected:
            raise ValueError(
                f"`num_warmup_steps_done` ({state['num_warmup_steps_done']}) does not match this sampler "
                f"({expected}); the state was saved by a sampler with other lengths, seed, layout or warmup")
        self._resume = (epoch, done)
        self._num_yielded = done

    def _keys(self, indices: list[int]) -> list[DocumentKey]:
        """The micro-batch as the collator takes it: keys of this epoch, with their rows when planning rows (listed row
        by row: in the given order unless best fit needs fewer rows, which the collator then lays out as given)."""
        if self.row_length is None:
            return [DocumentKey(index, self.epoch) for index in indices]
        rows = fewest_rows([self.lengths[index] for index in indices], self.row_length)
        return [DocumentKey(indices[position], self.epoch, row) for row, positions in enumerate(rows)
                for position in positions]

    # ---- planning ----
    def _num_steps(self, epoch: int) -> int:
        if epoch not in self._num_steps_by_epoch:
            self._plan(epoch)
        return self._num_steps_by_epoch[epoch]

    def _first_step(self, epoch: int) -> int:
        """Optimizer steps before `epoch`, capped at `num_warmup_steps` (after that budgets are constant)."""
        step = 0
        for earlier in range(epoch):
            if step >= self.num_warmup_steps:
                break
            step += self._num_steps(earlier)
        return min(step, self.num_warmup_steps)

    def _cost(self, batch: _MicroBatch) -> int:
        """Tokens the micro-batch's tensors hold: padded rows, packed rows (filled in order), or one row."""
        indices, total, longest = batch
        if self.padded:
            return len(indices) * longest
        if self.row_length is None:
            return total
        return len(next_fit([self.lengths[index] for index in indices], self.row_length)) * self.row_length

    def _plan(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`; also records the epoch's step and drop counts."""
        if self._cached_plan is not None and self._cached_plan[0] == epoch:
            return self._cached_plan[1]
        n, per_step, first_step = len(self.lengths), self.dp_size * self.grad_accum, self._first_step(epoch)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        micro_batches: list[_MicroBatch] = []
        for start in range(0, n, self.buffer_size):
            chunk = order[start:start + self.buffer_size]
            pack = self._pack_rows if self.row_length is not None else self._pack_budget
            micro_batches.extend(pack(chunk, len(micro_batches), first_step, per_step))

        num_dropped, shortfall = 0, -len(micro_batches) % per_step
        if shortfall and len(micro_batches) + shortfall <= n:
            micro_batches = self._split_costliest(micro_batches, shortfall)
        elif shortfall and self.drop_last:
            kept = len(micro_batches) - len(micro_batches) % per_step
            num_dropped = sum(len(batch[0]) for batch in micro_batches[kept:])
            micro_batches = micro_batches[:kept]
            logger.warning("epoch %d: drop_last dropped %d documents", epoch, num_dropped)
        elif shortfall:
            raise ValueError(
                f"epoch {epoch}: the {n} documents pack into {len(micro_batches)} micro-batches, and even one "
                f"document per micro-batch cannot make a multiple of data_parallel_size * "
                f"micro_batches_per_step = {per_step}; pass drop_last=True to drop the last "
                f"{len(micro_batches) % per_step} micro-batches, or use fewer ranks or micro-batches per step")

        plan = []
        for start in range(0, len(micro_batches), per_step):
            step_batches = sorted(micro_batches[start:start + per_step], reverse=True,
                                  key=self._cost)
            for slot in range(self.grad_accum):
                rank_in_band = self.rank if slot % 2 == 0 else self.dp_size - 1 - self.rank
                plan.append(step_batches[slot * self.dp_size + rank_in_band][0])
        self._num_steps_by_epoch[epoch] = len(micro_batches) // per_step
        self._num_dropped_by_epoch[epoch] = num_dropped
        self._cached_plan = (epoch, plan)
        return plan

    def _pack_budget(self, chunk: list[int], num_before: int, first_step: int, per_step: int) -> list[_MicroBatch]:
        """Best fit of documents, longest first, into micro-batches under the budget of their step."""
        # A micro-batch's position fixes its step; splitting (in _plan) only moves micro-batches later, to steps whose
        # budget is never smaller.
        sizes = [self.lengths[index] for index in chunk]
        packed = best_fit(sizes, lambda position: self.budget_at_step(first_step + (num_before + position) // per_step),
                          padded=self.padded)
        return [self._micro_batch([chunk[position] for position in batch]) for batch in packed]

    def _pack_rows(self, chunk: list[int], num_before: int, first_step: int, per_step: int) -> list[_MicroBatch]:
        """Best fit of documents, longest first, into rows of `row_length`; then runs of rows, in the order the
        rows were opened, into micro-batches of `budget // row_length` rows. Indices are listed row by row, so
        filling rows in the given order needs at most these rows (it may pull a document forward into an earlier row
        with room)."""
        rows = [[chunk[position] for position in row]
                for row in best_fit([self.lengths[index] for index in chunk], self.row_length)]
        micro_batches: list[_MicroBatch] = []
        row = 0
        while row < len(rows):
            step = first_step + (num_before + len(micro_batches)) // per_step
            num_rows = max(1, self.budget_at_step(step) // self.row_length)
            micro_batches.append(self._micro_batch([index for members in rows[row:row + num_rows] for index in members]))
            row += num_rows
        return micro_batches

    def _micro_batch(self, indices: list[int]) -> _MicroBatch:
        lengths = [self.lengths[index] for index in indices]
        return indices, sum(lengths), max(lengths)

    def _split_costliest(self, micro_batches: list[_MicroBatch], count: int) -> list[_MicroBatch]:
        """Split the costliest multi-document micro-batch in two, `count` times; halves stay in place."""
        pieces = [[batch] for batch in micro_batches]  # original position -> its pieces, in order
        heap = [(-self._cost(b), serial, serial, b)
                for serial, b in enumerate(micro_batches) if len(b[0]) > 1]
        heapq.heapify(heap)
        serial = len(micro_batches)
        for _ in range(count):
            _, _, position, batch = heapq.heappop(heap)
            by_length = sorted(batch[0], key=self.lengths.__getitem__, reverse=True)
            halves = [(part, sum(self.lengths[i] for i in part), self.lengths[part[0]])
                      for part in (by_length[0::2], by_length[1::2])]
            at = next(i for i, piece in enumerate(pieces[position]) if piece is batch)
            pieces[position][at:at + 1] = halves
            for half in halves:
                if len(half[0]) > 1:
                    heapq.heappush(heap, (-self._cost(half), serial, position, half))
                    serial += 1
        return [piece for group in pieces for piece in group]


class TrainingStream(BatchRebalanceSampler):
    """A token-budget sampler's epochs end to end, in Trainer epochs of one fixed length: its first epoch's count.

    Token-budget epochs differ in length (each permutation packs into its own count, warmup epochs hold more, smaller
    micro-batches), while `transformers.Trainer` (5.x) takes the first epoch's length for every epoch: for the loop,
    for the resume position (`global_step // steps per epoch`) and for the number of epochs `max_steps` needs. Cut
    into equal pieces, the stream makes all three exact with Trainer's own arithmetic, and its micro-batches are the
    ones the epochs yield in turn, each key carrying its own epoch (the noise seed): Trainer epoch k is micro-batches
    [k * len(self), (k + 1) * len(self)) of the stream. `set_epoch(k)` picks the piece; the trainer also sets it at
    each epoch start (a callback), since Trainer's own call does not reach it behind accelerate's skip wrapper.
    """

    def __init__(self, sampler: TokenBudgetBatchSampler):
        # Not named `sampler`: accelerate's set_epoch would reach through that name and set the plans' epoch.
        self.plans = sampler
        super().__init__(lengths=sampler.lengths, effective_batch_size=len(sampler.lengths), dp_size=sampler.dp_size,
                         grad_accum=sampler.grad_accum, shuffle=sampler.shuffle, seed=sampler.seed, rank=sampler.rank,
                         drop_last=sampler.drop_last)
        self.num_micro_batches = sampler.num_micro_batches(0)
        self.steps_per_epoch = self.num_micro_batches // sampler.grad_accum

    def __len__(self) -> int:
        return self.num_micro_batches

    def __iter__(self) -> Iterator[list[DocumentKey]]:
        # The plans' own resume path: start `offset` micro-batches into `epoch`, then the next epochs in turn.
        epoch, offset = self.plans.locate_micro_batch(self.epoch * self.num_micro_batches)
        remaining = self.num_micro_batches
        while remaining:
            self.plans.load_state_dict({"epoch": epoch, "num_micro_batches_yielded": offset})
            for micro_batch in self.plans:
                yield micro_batch
                remaining -= 1
                if not remaining:
                    return
            epoch, offset = epoch + 1, 0


def _validate(lengths, max_tokens, rank, size, buffer_size, per_step, warmup_tokens, warmup_steps) -> None:
    if not lengths:
        raise ValueError("`lengths` is empty: the sampler needs at least one document; check that the "
                         "training dataset is not empty after preprocessing and filtering")
    for name, value in (("max_tokens_per_micro_batch", max_tokens), ("data_parallel_size", size),
                        ("buffer_size", buffer_size), ("micro_batches_per_step", per_step)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` ({value!r}) must be a positive integer; pass a value >= 1")
    if not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"`data_parallel_rank` ({rank!r}) must be in [0, data_parallel_size={size}); pass this "
                         f"process's index along the data-parallel mesh axis, not its global rank")
    shortest = min(range(len(lengths)), key=lengths.__getitem__)
    if lengths[shortest] < 1:
        raise ValueError(f"`lengths[{shortest}]` ({lengths[shortest]}) must be positive; filter out empty documents")
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if max_tokens < lengths[longest]:
        raise ValueError(
            f"`max_tokens_per_micro_batch` ({max_tokens}) is below the longest document (index {longest}, "
            f"{lengths[longest]} tokens); raise max_tokens_per_micro_batch to at least {lengths[longest]} "
            f"or filter/truncate documents longer than {max_tokens} tokens")
    if len(lengths) < size * per_step:
        raise ValueError(
            f"`lengths` has {len(lengths)} documents but every optimizer step needs data_parallel_size * "
            f"micro_batches_per_step = {size * per_step} micro-batches of at least one document; use more "
            f"documents, fewer data-parallel ranks or a smaller micro_batches_per_step")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`num_warmup_steps` ({warmup_steps!r}) must be a non-negative integer; use 0 for no warmup")
    if (warmup_tokens is None) != (warmup_steps == 0):
        raise ValueError(
            f"`warmup_initial_tokens` ({warmup_tokens!r}) and `num_warmup_steps` ({warmup_steps}) go together: "
            f"pass both for a batch-size warmup, or neither (None and 0)")
    if warmup_tokens is not None and not lengths[longest] <= warmup_tokens <= max_tokens:
        raise ValueError(
            f"`warmup_initial_tokens` ({warmup_tokens!r}) must be between the longest document (index {longest}, "
            f"{lengths[longest]} tokens) and max_tokens_per_micro_batch ({max_tokens}); raise it, or "
            f"filter/truncate documents longer than {warmup_tokens} tokens")


def _validate_row_length(row_length, padded, lengths, max_tokens, warmup_tokens) -> None:
    if row_length is None:
        return
    if padded:
        raise ValueError("`row_length` packs documents into rows and `padded=True` gives each its own row; "
                         "pass one of them")
    if not isinstance(row_length, int) or row_length < max(lengths):
        raise ValueError(f"`row_length` ({row_length!r}) must be an integer >= the longest document "
                         f"({max(lengths)} tokens); pass max_seq_len, or filter/truncate longer documents")
    smallest_budget = min(max_tokens, warmup_tokens or max_tokens)
    if smallest_budget < row_length:
        raise ValueError(f"the token budget ({smallest_budget}) holds no row of row_length={row_length} tokens; "
                         f"raise max_tokens_per_micro_batch (and warmup_initial_tokens) to at least {row_length}")


if __name__ == "__main__":  # the numbers quoted in the module docstring
    import time

    generator = torch.Generator().manual_seed(0)
    doc_lengths = (torch.randn(100_000, generator=generator) * 0.8 + 5.55).exp().clamp(16, 8192)
    doc_lengths = ((doc_lengths / 16).ceil() * 16).long().tolist()
    for buffer in (16, 128, 512, 2048):
        began = time.perf_counter()
        sampler = TokenBudgetBatchSampler(lengths=doc_lengths, max_tokens_per_micro_batch=8192, data_parallel_rank=0,
                                          data_parallel_size=1, seed=0, buffer_size=buffer)
        fill = sum(doc_lengths) / (len(sampler) * 8192)
        print(f"buffer_size={buffer:4d}: {len(sampler)} micro-batches, fill {fill:.3f}, "
              f"plan {time.perf_counter() - began:.2f} s")


class ReplicaEvalBatchSampler(BatchRebalanceSampler):
    """This data replica's share of a held-out set, in order, in batches of `batch_size`; every rank yields the
    same number of batches (FSDP forwards are collectives), a rank with fewer items repeating its first batch.

    accelerate's own sharding (`even_batches`) would instead repeat the first *documents* of the set on the last
    global batch, which the diffusion metrics (summed in the trainer, not gathered) would count twice. Here the
    repeats are whole batches past `num_real_batches`, which the trainer leaves out of the metrics.
    """

    def __init__(self, *, num_items: int, batch_size: int, data_parallel_rank: int, data_parallel_size: int):
        if batch_size < 1:
            raise ValueError(f"per_device_eval_batch_size ({batch_size}) must be >= 1.")
        # The parent is only the type Trainer recognises as rank-aware; its planning is not used.
        placeholder = max(num_items, data_parallel_size)
        super().__init__(lengths=[1] * placeholder, effective_batch_size=placeholder, dp_size=data_parallel_size,
                         grad_accum=1, shuffle=False, rank=data_parallel_rank, drop_last=False)
        share = list(range(data_parallel_rank, num_items, data_parallel_size))
        self.batches = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
        self.num_real_batches = len(self.batches)
        num_batches = math.ceil(math.ceil(num_items / data_parallel_size) / batch_size)
        filler = self.batches[0] if self.batches else [0]
        self.batches += [filler] * (num_batches - len(self.batches))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @staticmethod
    def of(dataloader) -> ReplicaEvalBatchSampler:
        """The sampler behind a dataloader, also once accelerate prepared it (it wraps the batch sampler in a
        `BatchSamplerShard`, whose `batch_sampler` is ours)."""
        sampler = getattr(dataloader, "batch_sampler", None)
        while sampler is not None and not isinstance(sampler, ReplicaEvalBatchSampler):
            sampler = getattr(sampler, "batch_sampler", None)
        if sampler is None:
            raise ValueError("this dataloader does not draw its batches from a ReplicaEvalBatchSampler; build it "
                             "with DiffusionTrainer.get_eval_dataloader(dataset, mask_rate=...).")
        return sampler
