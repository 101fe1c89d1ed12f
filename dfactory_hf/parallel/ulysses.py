"""Ulysses sequence parallel as attention functions registered in transformers' `AttentionInterface`.

Each sp rank holds 1/sp of every row (`sequence.py`); every attention layer does::

    q, k, v   [B, heads, S/sp, D]  --one all-to-all-->  [B, heads/sp, S, D]   this rank's heads, whole sequence
    attention over the whole sequence with the caller's FULL-length mask (4D tensor or BlockMask), as given
    out       [B, S, heads/sp, D]  --one all-to-all-->  [B, S/sp, heads, D]

The model code does not change: `apply_sequence_parallel(model, sp_size)` switches the model to the Ulysses
variant of the backend it was loaded with ("sdpa" -> "ulysses_sdpa"; also "eager" and "flex_attention"), so
the user keeps naming the backend as usual and the variant follows from `sp_size`. The variant reads the
layout from the `sequence_shard=` keyword the trainer passes with each batch (no global state); a call
without it is the plain backend (generation runs whole sequences on every rank). The mask must come from
outside: a model under sp sees only S/sp positions, so any mask it built itself would be too short. A 2D
padding mask is therefore refused (`AttentionMaskInterface` entry below) instead of being silently dropped,
which is what transformers does to 2D masks for attention names it has no mask builder for.

Grouped-query attention past the KV-head count (LLaDA2.0: 16 query heads, 4 KV heads, sp up to 16): rank j
receives the contiguous query heads [j H/sp, (j+1) H/sp). When sp does not divide the KV heads, each KV head
is repeated r times before the all-to-all (`kv_repeats`: the smallest r with sp | K r and r | H/K), so rank j
receives exactly the KV heads its query heads read. The extra traffic is (r - 1) K / (H + 2K) of the
all-to-all volume (r = 4 at sp = 16 for LLaDA2.0: 2x the bytes of sp <= 4).

Order of positions: the all-to-all delivers rank i's pieces of every segment, i.e. [sp, segment, piece];
the mask is in [segment, sp, piece] order ([x_t ; x_0]); one permute (the copy the reshape needs anyway)
converts, so the mask is used unchanged and no index gather is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed._functional_collectives as funcol
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from ..diffusion.masks import ATTN_IMPLEMENTATIONS
from ..models.llada2_moe.modeling_llada2_moe import eager_attention_forward  # the same plain attention
from .sequence import SequenceShard

ULYSSES_PREFIX = "ulysses_"


def ulysses_name(backend: str) -> str:
    return backend if backend.startswith(ULYSSES_PREFIX) else ULYSSES_PREFIX + backend


def base_backend(name: str) -> str:
    """The backend a (possibly Ulysses) attention implementation name computes with."""
    return name.removeprefix(ULYSSES_PREFIX) if name else name


def kv_repeats(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How often each KV head is repeated before the all-to-all so sp ranks each get their query heads' KV."""
    group = num_heads // num_kv_heads
    for r in range(1, group + 1):
        if group % r == 0 and (num_kv_heads * r) % sp_size == 0:
            return r
    raise AssertionError("unreachable: r = num_heads / num_kv_heads always works when sp divides num_heads")


def check_sequence_parallel_heads(num_heads: int, num_kv_heads: int, sp_size: int) -> None:
    if num_heads % sp_size:
        valid = ", ".join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)
        raise ValueError(
            f"--sp_size ({sp_size}) must divide the model's num_attention_heads ({num_heads}): Ulysses gives each "
            f"sp rank whole query heads (num_key_value_heads {num_kv_heads} is served by repeating KV heads); "
            f"use one of {valid}.")


def apply_sequence_parallel(model, sp_size: int) -> str:
    """Switch `model` to the Ulysses variant of its attention backend; returns the backend name. Idempotent."""
    config = model.config
    current = config._attn_implementation
    backend = base_backend(current)
    if backend not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"--sp_size ({sp_size}) needs an attention backend that takes the full-length block-diffusion mask, "
            f"but the model uses attn_implementation={current!r}; load it with attn_implementation in "
            f"{ATTN_IMPLEMENTATIONS} (flex_attention on GPU, sdpa elsewhere).")
    check_sequence_parallel_heads(config.num_attention_heads, config.num_key_value_heads, sp_size)
    if current != ulysses_name(backend):
        model.set_attn_implementation(ulysses_name(backend))
    return backend


# --- the two all-to-alls ---------------------------------------------------------------------------------------

def _all_to_all(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Chunk j of dim 0 goes to rank j; chunk i of the result came from rank i (autograd: the reverse a2a)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), None, None, shard.group))


def _sequence_to_heads(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """[B, sp, h, S/sp, D] (heads grouped by destination rank) -> [B, h, S, D] in the mask's order."""
    batch, sp, heads, local_len, dim = x.shape
    piece = local_len // shard.num_segments
    received = _all_to_all(x.transpose(0, 1), shard)  # [sp (source rank), B, h, S/sp, D]
    received = received.reshape(sp, batch, heads, shard.num_segments, piece, dim)
    return received.permute(1, 2, 3, 0, 4, 5).reshape(batch, heads, sp * local_len, dim)


def _heads_to_sequence(out: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """Attention output [B, S, h, D] in the mask's order -> this rank's positions, all heads [B, S/sp, sp h, D]."""
    batch, seq_len, heads, dim = out.shape
    sp, segments = shard.size, shard.num_segments
    piece = seq_len // (segments * sp)
    send = out.reshape(batch, segments, sp, piece, heads, dim).permute(2, 0, 1, 3, 4, 5)  # [sp (dest), B, ...]
    received = _all_to_all(send, shard)  # [sp (source head chunk), B, segments, piece, h, D]
    return received.permute(1, 2, 3, 0, 4, 5).reshape(batch, segments * piece, sp * heads, dim)


class _LocalHeads:
    """The attention module as the backend sees it on one sp rank: fewer heads, a different query/KV ratio."""

    def __init__(self, module, num_key_value_groups: int):
        self._module = module
        self.num_key_value_groups = num_key_value_groups

    def __getattr__(self, name):
        return getattr(self._module, name)


def _check_full_length_mask(mask, seq_len: int) -> None:
    if mask is None:
        return
    lengths = tuple(mask.seq_lengths) if isinstance(mask, BlockMask) else tuple(mask.shape[-2:])
    if lengths != (seq_len, seq_len):
        raise ValueError(
            f"sequence parallel attention got a mask for {lengths} positions but the gathered sequence has "
            f"{seq_len}; build the full-length mask outside the model (diffusion/masks.py build_attention_mask on "
            "the whole row) and pass it as attention_mask.")


def ulysses_attention(backend: Callable) -> Callable:
    """The Ulysses variant of one attention function (`AttentionInterface` signature)."""

    def attention(module, query, key, value, attention_mask, *, sequence_shard: SequenceShard | None = None,
                  **kwargs):
        if sequence_shard is None:
            return backend(module, query, key, value, attention_mask, **kwargs)
        shard = sequence_shard
        batch, num_heads, local_len, dim = query.shape
        repeats = kv_repeats(num_heads, key.shape[1], shard.size)
        if repeats > 1:
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        # One all-to-all for q, k and v: each rank's chunk is [its query heads, its KV heads, its V heads].
        chunks = [t.reshape(batch, shard.size, -1, local_len, dim) for t in (query, key, value)]
        local_q, local_kv = chunks[0].shape[2], chunks[1].shape[2]
        gathered = _sequence_to_heads(torch.cat(chunks, dim=2), shard)  # [B, h_q + 2 h_kv, S, D]
        query, key, value = gathered.split([local_q, local_kv, local_kv], dim=1)
        _check_full_length_mask(attention_mask, gathered.shape[2])
        out, _ = backend(_LocalHeads(module, local_q // local_kv), query, key, value, attention_mask, **kwargs)
        return _heads_to_sequence(out, shard), None

    return attention


def _refuse_2d_mask(*args, attention_mask=None, **kwargs):
    if attention_mask is None:
        return None  # no mask: bidirectional over the whole (gathered) sequence, which is what no mask means
    raise ValueError(
        "a model switched to sequence-parallel attention was given a 2D padding mask; it sees 1/sp of the row and "
        "cannot build the mask itself: pass the full-length 4D mask or BlockMask (diffusion/masks.py "
        "build_attention_mask), or model.set_attn_implementation('sdpa') to run it unsharded.")


for _name, _backend in (("sdpa", sdpa_attention_forward), ("eager", eager_attention_forward),
                        ("flex_attention", flex_attention_forward)):
    AttentionInterface.register(ulysses_name(_name), ulysses_attention(_backend))
    AttentionMaskInterface.register(ulysses_name(_name), _refuse_2d_mask)
