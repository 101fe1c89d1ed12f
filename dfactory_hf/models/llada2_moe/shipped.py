"""Shipped LLaDA2-MoE configs that keep the real architecture's shape at small scale.

Both have several expert groups, top-k > 1, a shared expert, a dense first layer, GQA and partial rotary:
- `tiny` (1.9M parameters): tests and the CPU demo (vocab 128 = the shipped character tokenizer). Two choices
  make the demo's arithmetic learnable in a few thousand CPU steps, found by measurement (3000 steps, held-out
  exact match): weights initialised at std 0.08 ~ 1/sqrt(hidden) instead of 0.02 (98% for seeds 42 and 2,
  against 23% and 3%), and MoE layers that activate 2 routed + 2 shared experts of width 128 (narrower
  experts, 96 wide with one shared: 12-60% depending on the seed).
- `small` (~120M parameters, vocab 32768): benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from .configuration_llada2_moe import LLaDA2MoeConfig

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = tuple(sorted(path.stem for path in CONFIG_DIR.glob("*.json")))


def shipped_config(name: str, **overrides) -> LLaDA2MoeConfig:
    """`shipped_config("tiny", pad_token_id=1)` -> a fresh config; overrides replace fields."""
    if name not in SHIPPED_CONFIGS:
        raise ValueError(f"Unknown shipped config {name!r}; choose one of {', '.join(SHIPPED_CONFIGS)}.")
    fields = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    fields.pop("model_type", None)
    return LLaDA2MoeConfig(**{**fields, **overrides})
