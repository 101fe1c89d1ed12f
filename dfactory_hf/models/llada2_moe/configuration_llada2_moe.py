"""Configuration of LLaDA2-MoE (`model_type = "llada2_moe"`), reading the hub `config.json` as it is.

Field names are the hub's (`num_experts`, `n_group`, `rope_theta`, ...), so a checkpoint's own config loads
unchanged and `save_pretrained` writes a file the hub's remote code (transformers 4.x) still reads: unknown
hub fields are kept as attributes and written back, and `torch_dtype` is written next to `dtype`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class LLaDA2MoeConfig(PreTrainedConfig):
    r"""
    Architecture of LLaDA2.0 (mini 16B, flash 100B): a bidirectional decoder with a fused QKV projection,
    per-head query/key RMSNorm, partial rotary embeddings, GQA, `first_k_dense_replace` dense SwiGLU layers and
    then mixture-of-experts layers (sigmoid router with group-limited top-k and a selection-only expert bias,
    routed SwiGLU experts plus always-on shared experts).

    Values of the LLaDA2.0-mini checkpoint are the defaults. The attention has no causal mask of its own: the
    caller passes the (block-diffusion) mask; with no mask the model attends bidirectionally.
    """

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # transformers' MoE machinery (expert parallel, kernels) reads `num_local_experts`.
    attribute_map = {"num_local_experts": "num_experts"}
    # Expert parallel in the style transformers uses for its own MoE models: routed experts are sharded over
    # the `ep` mesh and tokens are dispatched with all-to-all. Applied from outside the model.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "word_embeddings": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float | int = 600000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float | int = 0.5
    use_qkv_bias: bool = False
    use_bias: bool = False
    attention_dropout: float | int = 0.0
    num_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float | int = 2.5
    norm_topk_prob: bool = True
    num_shared_experts: int | None = 1
    moe_intermediate_size: int = 512
    moe_shared_expert_intermediate_size: int | None = None
    first_k_dense_replace: int = 1
    output_router_logits: bool = False
    is_causal: bool = False
    pad_token_id: int | None = 156892
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 156892

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject shapes the model cannot build; called by the model, after loading the config."""
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts % self.n_group:
            problems.append(f"num_experts ({self.num_experts}) must be a multiple of n_group ({self.n_group})")
        elif self.num_experts // self.n_group < 2:
            problems.append(
                f"each expert group needs at least 2 experts (groups are scored by their top-2): "
                f"num_experts ({self.num_experts}) / n_group ({self.n_group}) < 2"
            )
        if not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group ({self.topk_group}) must be in [1, n_group ({self.n_group})]")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * (self.num_experts // max(self.n_group, 1)):
            problems.append(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, topk_group * experts per group]"
            )
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            problems.append(
                f"head_dim ({self.head_dim}) * partial_rotary_factor ({self.partial_rotary_factor}) must be an even "
                f"number in (0, head_dim]"
            )
        hub_rotary_dim = getattr(self, "rotary_dim", None)  # some hub configs also state it explicitly
        if hub_rotary_dim is not None and hub_rotary_dim != self.rope_dim:
            problems.append(
                f"rotary_dim ({hub_rotary_dim}) disagrees with head_dim * partial_rotary_factor ({self.rope_dim})"
            )
        if self.rope_scaling is not None:
            problems.append(f"rope_scaling ({self.rope_scaling}) is not supported; LLaDA2 checkpoints use null")
        if problems:
            raise ValueError("Invalid LLaDA2-MoE config: " + "; ".join(problems) + ".")

    @property
    def rope_dim(self) -> int:
        """Leading dims of each head that get rotary embeddings; the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_expert_intermediate_size(self) -> int:
        if self.moe_shared_expert_intermediate_size is not None:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * (self.num_shared_experts or 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def to_dict(self):
        output = super().to_dict()
        # The hub's remote code (transformers 4.x) reads `torch_dtype`.
        if output.get("dtype") is not None:
            output["torch_dtype"] = output["dtype"]
        return output


__all__ = ["LLaDA2MoeConfig"]
