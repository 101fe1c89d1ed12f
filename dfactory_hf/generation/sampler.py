"""Block-diffusion generation for LLaDA2-style models, batched, with a KV cache of committed blocks.

    from dfactory_hf import generate
    answers = generate(model, [prompt_a, prompt_b], gen_length=256, eos_token_id=eos, mask_token_id=mask)

Algorithm (REFERENCE 3): the canvas is each prompt followed by mask tokens. Blocks are aligned to absolute
positions (block k = positions [k * block_length, (k + 1) * block_length), position 0 = the row's first prompt
token). Generation starts at the block that holds the first generated position and denoises one block at a
time under a block-causal mask (a block sees itself and every earlier block; `generation_key_intervals` in
`diffusion/masks.py`); see `decoding.py` for the per-step rule. A row stops after the block holding its first EOS (or, with `eos_early_stop`, once an EOS has
no mask before it), or when its gen_length tokens are covered.

Batch layout: row i with a P_i-token prompt is left-padded by whole blocks so that every row's first generated
position lies in the same canvas block; padding is invisible to real tokens and position ids restart at 0 at
each row's first real token, so a batch decodes exactly like its rows one at a time.

Cache: committed blocks never change, and under the block-causal mask their keys/values depend only on
themselves and earlier blocks. `use_cache=True` therefore prefills the blocks before the first generated block
once, runs each denoising step on the current block alone (then crops the cache back, so uncommitted tokens
never stay in it) and appends each finished block once. `use_cache=False` recomputes the whole prefix at every
step (the reference). At temperature 0 both give the same tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from ..diffusion.masks import KeyIntervals, generation_attention_mask, generation_key_intervals
from .defaults import resolve_decoding_args
from .decoding import pick_tokens, select_positions_to_commit, select_positions_to_edit, transfer_schedule
from .validation import check_attention_backend, check_prompt_lengths, normalize_prompts, validate_generation_args

BlockCallback = Callable[[list[list[int]], int], None]


@dataclass
class DenoisingStep:
    """What one denoising step saw and decided, for `generate(on_step=...)` (visualisation, debugging).

    All [B, L] over the current block, except `logits` [B, L, V]; rows that are done have nothing masked.
    Only still-masked positions get logits, a token and a confidence (with `edit_threshold`, also the block's
    filled generated positions); the others hold zeros.
    """

    block_index: int  # generated blocks counted from 0
    step: int
    logits: torch.Tensor
    tokens: torch.Tensor  # the picked token at every position
    confidence: torch.Tensor  # its probability
    still_masked: torch.Tensor  # bool: masked before this step
    committed: torch.Tensor  # bool: committed by this step
    edited: torch.Tensor | None = None  # bool: filled earlier, rewritten by this step (draft-and-edit decoding)


@dataclass
class Canvas:
    """The batch laid out on whole blocks; every tensor but `row_last_block` is [B, num_blocks * block_length]."""

    tokens: torch.Tensor  # prompt, then mask tokens; left padding holds mask tokens too (never attended)
    position_ids: torch.Tensor  # 0 at each row's first prompt token, 0 on padding
    is_real: torch.Tensor  # bool: not left padding
    answer: torch.Tensor  # bool: the row's gen_length answer positions
    to_fill: torch.Tensor  # bool: the answer, then the rest of the row's last block (the canvas is whole blocks)
    row_last_block: torch.Tensor  # long [B]: the last canvas block a row needs
    first_block: int  # the canvas block holding every row's first generated position
    block_length: int
    key_intervals: KeyIntervals  # the block-causal mask of the whole canvas (diffusion/masks.py)

    @property
    def num_blocks(self) -> int:
        return self.tokens.shape[1] // self.block_length


def build_canvas(
    prompts: list[list[int]], *, gen_length: int, block_length: int, mask_token_id: int, device: torch.device
) -> Canvas:
    prompt_lengths = torch.tensor([len(prompt) for prompt in prompts])
    first_gen_block = prompt_lengths // block_length  # per row, in its own (unpadded) block numbering
    first_block = int(first_gen_block.max())
    pad_lengths = (first_block - first_gen_block) * block_length
    answer_ends = pad_lengths + prompt_lengths + gen_length
    row_last_block = (answer_ends - 1) // block_length
    num_blocks = int(row_last_block.max()) + 1

    batch, length = len(prompts), num_blocks * block_length
    tokens = torch.full((batch, length), mask_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = int(pad_lengths[row])
        tokens[row, start : start + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    index = torch.arange(length).expand(batch, length)
    is_real = index >= pad_lengths[:, None]
    answer_starts = pad_lengths + prompt_lengths
    answer = (index >= answer_starts[:, None]) & (index < answer_ends[:, None])
    to_fill = (index >= answer_starts[:, None]) & (index < (row_last_block[:, None] + 1) * block_length)
    return Canvas(
        tokens=tokens.to(device),
        position_ids=(index - pad_lengths[:, None]).clamp(min=0).to(device),
        is_real=is_real.to(device),
        answer=answer.to(device),
        to_fill=to_fill.to(device),
        row_last_block=row_last_block.to(device),
        first_block=first_block,
        block_length=block_length,
        key_intervals=generation_key_intervals(pad_lengths.to(device), length=length, block_size=block_length),
    )


def _forward(
    model, canvas: Canvas, query_start: int, query_end: int, cache: DynamicCache | None,
    logits_to_keep: int | torch.Tensor,
) -> torch.Tensor:
    """Run the model on canvas[:, query_start:query_end] (earlier keys come from `cache`).

    `logits_to_keep`: an int n gives the logits of the last n positions [B, n, V]; a bool [B, query_end -
    query_start] gives those of the True positions [N, V] (only still-masked positions need a distribution).
    """
    output = model(
        input_ids=canvas.tokens[:, query_start:query_end],
        attention_mask=generation_attention_mask(canvas.key_intervals, query_start=query_start, query_end=query_end),
        position_ids=canvas.position_ids[:, query_start:query_end],
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=logits_to_keep,
    )
    return output.logits


def _drop_uncommitted(cache: DynamicCache, keep_length: int) -> None:
    excess = cache.get_seq_length() - keep_length
    if excess > 0:
        cache.crop(-excess)  # a negative argument removes that many trailing tokens in every transformers version


def _eos_stopped(canvas: Canvas, eos_token_id: int | None, end: int, *, mask_token_id: int) -> torch.Tensor:
    """bool [B]: the row's answer (up to canvas position `end`) holds an EOS with no mask token before it."""
    if eos_token_id is None:
        return torch.zeros(canvas.tokens.shape[0], dtype=torch.bool, device=canvas.tokens.device)
    tokens, answer = canvas.tokens[:, :end], canvas.answer[:, :end]
    is_eos = answer & (tokens == eos_token_id)
    mask_so_far = (answer & (tokens == mask_token_id)).cumsum(dim=-1) > 0
    return (is_eos & ~mask_so_far).any(dim=-1)


def _answer_tokens(canvas: Canvas, row: int, end: int, eos_token_id: int | None) -> list[int]:
    """Row's answer tokens in canvas positions [.., end), cut after the first EOS."""
    tokens = canvas.tokens[row, :end][canvas.answer[row, :end]].tolist()
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id) + 1]
    return tokens


@torch.no_grad()
def _decode(
    model,
    canvas: Canvas,
    *,
    steps: int,
    threshold: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    mask_token_id: int,
    eos_early_stop: bool,
    use_cache: bool,
    generator: torch.Generator | None,
    on_block_committed: BlockCallback | None,
    on_step: Callable[[DenoisingStep], None] | None,
    edit_threshold: float | None = None,
    edit_steps: int = 0,
) -> list[list[int]]:
    block_length = canvas.block_length
    batch = canvas.tokens.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=canvas.tokens.device)
    emitted = [0] * batch  # answer tokens already handed to on_block_committed, per row

    cache = DynamicCache() if use_cache else None
    if cache is not None and canvas.first_block > 0:
        _forward(model, canvas, 0, canvas.first_block * block_length, cache, logits_to_keep=1)

    editing = edit_threshold is not None
    for block in range(canvas.first_block, canvas.num_blocks):
        start, end = block * block_length, (block + 1) * block_length
        block_tokens = canvas.tokens[:, start:end]  # a view: commits write into the canvas
        still_masked = canvas.to_fill[:, start:end] & (block_tokens == mask_token_id) & ~done[:, None]  # [B, L]
        editable = torch.zeros_like(still_masked)  # generated positions of this block already filled
        schedule = transfer_schedule(still_masked.sum(dim=-1), steps)  # [B, steps]
        block_cached = False  # the cache already holds this block's final keys and values

        # Unmasking takes at most `steps` passes (the schedule); editing may add `edit_steps` passes after it.
        edit_only_passes = 0
        for step in itertools.count():
            unmasking = bool(still_masked.any())
            if not unmasking:
                if not editing or edit_only_passes == edit_steps or not editable.any():
                    break
                edit_only_passes += 1
            live = still_masked | editable if editing else still_masked  # the positions that need logits
            # lm_head only where a decision is taken: the other logits would be thrown away.
            if cache is None:
                keep = torch.nn.functional.pad(live, (start, 0))  # [B, end]
                live_logits = _forward(model, canvas, 0, end, None, keep)
            else:
                live_logits = _forward(model, canvas, start, end, cache, live)
            picked, picked_confidence = pick_tokens(
                live_logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            tokens = torch.zeros_like(block_tokens).masked_scatter_(live, picked)
            confidence = torch.zeros(live.shape, device=picked.device).masked_scatter_(live, picked_confidence)
            scheduled = schedule[:, step] if step < steps else 0  # past `steps` nothing is masked any more
            commit = select_positions_to_commit(confidence, still_masked, scheduled, threshold)
            # An edit never writes the mask token back (that would re-mask a position outside the schedule).
            edit = (select_positions_to_edit(confidence, tokens, block_tokens, editable, edit_threshold)
                    & (tokens != mask_token_id) if editing else torch.zeros_like(commit))
            block_tokens.copy_(torch.where(commit | edit, tokens, block_tokens))
            if cache is not None:
                # A pass that found nothing to change ran on the block's final tokens: its keys and values are the
                # ones the block appends, so they stay (editing only; one forward fewer per block).
                block_cached = editing and not unmasking and not edit.any()
                if not block_cached:
                    _drop_uncommitted(cache, start)
            if on_step is not None:
                block_index = block - canvas.first_block
                logits = live_logits.new_zeros(*live.shape, live_logits.shape[-1])
                logits[live] = live_logits
                on_step(DenoisingStep(block_index, step, logits, tokens, confidence, still_masked, commit, edit))
            still_masked = still_masked & ~commit  # not in place: on_step may keep the previous tensor
            editable = editable | commit
            if eos_early_stop:
                stopped = _eos_stopped(canvas, eos_token_id, end, mask_token_id=mask_token_id) & ~done
                done |= stopped
                still_masked = still_masked & ~stopped[:, None]
                editable = editable & ~stopped[:, None]
            if editing and not unmasking and not edit.any():
                break  # nothing masked and nothing to edit: the block is final
        assert not still_masked.any(), "the transfer schedule commits every masked position within `steps` steps"

        done |= _eos_stopped(canvas, eos_token_id, end, mask_token_id=mask_token_id)
        done |= canvas.row_last_block <= block
        if on_block_committed is not None:
            new_tokens = []
            for row in range(batch):
                so_far = _answer_tokens(canvas, row, end, eos_token_id)
                new_tokens.append(so_far[emitted[row] :])
                emitted[row] = len(so_far)
            on_block_committed(new_tokens, block - canvas.first_block)
        if done.all():
            break
        if cache is not None and not block_cached:
            _forward(model, canvas, start, end, cache, logits_to_keep=1)  # append the finished block's keys/values

    return [_answer_tokens(canvas, row, canvas.tokens.shape[1], eos_token_id) for row in range(batch)]


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    *,
    gen_length: int | None = None,
    block_length: int | None = None,
    steps: int | None = None,
    threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None,
    mask_token_id: int | None = None,
    eos_early_stop: bool = False,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_block_committed: BlockCallback | None = None,
    on_step: Callable[[DenoisingStep], None] | None = None,
    edit_threshold: float | None = None,
    edit_steps: int = 8,
) -> list[list[int]]:
    """Generate up to `gen_length` tokens after each prompt by block diffusion; returns one id list per prompt.

    prompt_ids: a list of token-id lists (lengths may differ) or a LongTensor [B, P] (B prompts of exactly P
    tokens, no padding). Each returned list excludes the prompt, has at most `gen_length` ids and ends after the
    first EOS when there is one (EOS included). `eos_token_id=None` never stops early.

    block_length / steps / threshold: the block size, the most denoising steps per block and the probability a
    position's token must exceed to be committed early (REFERENCE 3 defaults 32 / 32 / 0.95).
    temperature 0 is greedy; > 0 samples after top-k / top-p filtering, drawing from `generator` when given.
    eos_early_stop: stop a row as soon as it commits an EOS with no mask before it, instead of after its block.
    use_cache: reuse the keys/values of committed blocks (the same tokens as recomputing, up to fp rounding
    deciding a near-tie differently; far fewer FLOPs).
    on_block_committed(new_tokens, block_index): called after every generated block; `new_tokens[i]` are row i's
    answer tokens that this block added (concatenated over the calls they equal the returned list), and
    `block_index` counts generated blocks from 0.
    on_step(DenoisingStep): called after every denoising step's decision, before it is applied (see the class).
    edit_threshold: draft-and-edit decoding (LLaDA2.1): at every step, a generated position of the current block
    that is already filled is rewritten when the picked token differs from it with probability above this, at
    the same step as the unmasking set. None (default) never edits: token for token today's decoding. A low
    `threshold` ("speed mode") commits drafts early and relies on the edits to repair them.
    edit_steps: with editing, the most extra passes per block once nothing is masked (edits cannot flip
    forever); a block ends earlier at the first of them that changes nothing. So a block costs up to one pass
    more than without editing when its drafts are right, and the cache then saves the append pass.
    Earlier blocks are never revised (multi-block editing is not implemented).

    gen_length / block_length / steps / threshold / mask_token_id left unset: the checkpoint's
    generation_config.json (written by DiffusionTrainer, attached at from_pretrained), else REFERENCE 3's defaults
    (defaults.py).

    The model runs in eval mode under no_grad (its training mode is restored afterwards) with 4D boolean
    block-causal masks, so its attention implementation must be sdpa or eager.
    """
    gen_length, block_length, steps, threshold, mask_token_id = resolve_decoding_args(
        model, gen_length=gen_length, block_length=block_length, steps=steps, threshold=threshold,
        mask_token_id=mask_token_id).values()
    validate_generation_args(
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        threshold=threshold,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        mask_token_id=mask_token_id,
        edit_threshold=edit_threshold,
        edit_steps=edit_steps,
    )
    prompts = normalize_prompts(prompt_ids)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    check_prompt_lengths(prompts, gen_length=gen_length, max_positions=max_positions)
    check_attention_backend(model.config)

    canvas = build_canvas(
        prompts, gen_length=gen_length, block_length=block_length, mask_token_id=mask_token_id, device=model.device
    )
    was_training = model.training
    model.eval()
    try:
        return _decode(
            model,
            canvas,
            steps=steps,
            threshold=threshold,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            mask_token_id=mask_token_id,
            eos_early_stop=eos_early_stop,
            use_cache=use_cache,
            generator=generator,
            on_block_committed=on_block_committed,
            on_step=on_step,
            edit_threshold=edit_threshold,
            edit_steps=edit_steps,
        )
    finally:
        model.train(was_training)
