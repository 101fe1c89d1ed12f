"""Shipped LLaDA2-MoE configs that keep the real architecture's shape at small scale.

Both have several expert groups, top-k > 1, a shared expert, a dense first layer, GQA and partial rotary:
- `tiny` (~1.6M parameters): tests and the CPU demo (vocab 128 = the shipped character tokenizer).
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
