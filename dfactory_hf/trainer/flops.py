"""Training FLOPs of a diffusion step, counted from the model's shapes and the batch's mask (no profiler).

Per optimizer micro-batch, forward matmul FLOPs (2 per multiply-add), then x 3 for forward + backward (the
backward of a matmul is two matmuls of the same size):

- per model position (2L in block diffusion: x_t and x_0; L in full-attention mode): the QKV and output
  projections, the dense SwiGLU layers, and in MoE layers the router, the `num_experts_per_tok` *active* routed
  experts and the shared experts;
- attention: QK^T and PV over the *allowed* entries of the mask only, 4 x head_dim x heads per (query, key)
  pair and layer; pairs are counted per document from its length (`attention_pairs`): block diffusion allows
  n x block + n^2 pairs for a document of n tokens (x_t sees its block, x_t the earlier clean blocks, x_0 its
  block-causal prefix), full attention n^2;
- the LM head at the supervised positions only (the trainer never computes the other logits).

This is the useful work (what MFU is about): a dense sdpa mask computes every pair of the row and the recipe's
step computes logits at all 2L positions, but neither is counted. Transformers' default `floating_point_ops`
(6 x all parameters x input tokens) counts L tokens, every expert and every logit; the trainer logs ours.
"""

from __future__ import annotations

import torch

# bf16 dense peak TFLOPS (no sparsity) of common accelerators, for `mfu`; matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0, "GB200": 2500.0, "MI300X": 1307.0, "A10G": 125.0, "L4": 121.0}


def position_matmul_flops(config) -> int:
    """Forward matmul FLOPs per model position, attention scores and the LM head excluded."""
    hidden, head_dim = config.hidden_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    attention = 2 * hidden * (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim * hidden
    dense_mlp = 3 * 2 * hidden * config.intermediate_size
    num_experts = getattr(config, "num_experts", 0) or 0
    moe_layers = max(config.num_hidden_layers - config.first_k_dense_replace, 0) if num_experts else 0
    shared = config.moe_shared_expert_intermediate_size or config.moe_intermediate_size * (config.num_shared_experts or 0)
    moe_mlp = (2 * hidden * num_experts  # router
               + config.num_experts_per_tok * 3 * 2 * hidden * config.moe_intermediate_size
               + (3 * 2 * hidden * shared if config.num_shared_experts else 0)) if num_experts else 0
    dense_layers = config.num_hidden_layers - moe_layers
    return config.num_hidden_layers * attention + dense_layers * dense_mlp + moe_layers * moe_mlp


def document_lengths(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """long [D]: token counts of the documents of a collated batch (each starts at position 0; a row's real tokens
    come first, so documents never span rows and a row-major flattening keeps them apart)."""
    real = attention_mask.bool().flatten()
    starts = real & (position_ids.flatten() == 0)
    document = starts.long().cumsum(0) - 1  # index of the document each position belongs to
    return torch.bincount(document[real], minlength=int(starts.sum()))


def attention_pairs(lengths: torch.Tensor, *, block_size: int, block_diffusion: bool) -> int:
    """Allowed (query, key) pairs of the mask, summed over documents of `lengths` (REFERENCE 1's table)."""
    lengths = lengths.long()
    pairs = (lengths * lengths).sum()
    if block_diffusion:
        pairs = pairs + block_size * lengths.sum()
    return int(pairs)


def training_flops(config, *, num_positions: int, num_attention_pairs: int, num_logits: int) -> int:
    """Forward + backward FLOPs of one micro-batch: positions through the layers, the allowed attention pairs and
    the LM head at `num_logits` positions."""
    attention = config.num_hidden_layers * 4 * config.head_dim * config.num_attention_heads * num_attention_pairs
    lm_head = 2 * config.hidden_size * config.vocab_size * num_logits
    return 3 * (position_matmul_flops(config) * num_positions + attention + lm_head)


def batch_training_flops(config, batch: dict[str, torch.Tensor], *, block_size: int, block_diffusion: bool,
                         num_logits: int) -> int:
    """`training_flops` of a collated batch: real positions only (x2 in block diffusion), allowed pairs."""
    lengths = document_lengths(batch["position_ids"], batch["attention_mask"])
    segments = 2 if block_diffusion else 1
    return training_flops(config, num_positions=segments * int(lengths.sum()), num_logits=num_logits,
                          num_attention_pairs=attention_pairs(lengths, block_size=block_size,
                                                              block_diffusion=block_diffusion))


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's bf16 dense peak in FLOP/s from `PEAK_BF16_TFLOPS`, or None (CPU, or an unknown device)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "GB200" before "B200"
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None
