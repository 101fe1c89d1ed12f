"""Block-diffusion decoding defaults: what a checkpoint's `generation_config.json` holds and `generate` reads.

DiffusionTrainer writes the file into every saved model folder with the values the run trained and evaluated
with: `block_length` = the trained block size, `steps` = one token per step at most (`block_length`),
`threshold` = `--eval_gen_threshold`, `gen_length` = `--eval_gen_length`, the mask, EOS and pad ids, greedy
decoding (`do_sample: false`). The LLaDA2 model class attaches it on `from_pretrained` as
`model.generation_config` (the model is no `GenerationMixin`, so transformers itself does not), and
`generate(...)` / `dfactory-hf generate` take each value from there when it is not given, else from
`DECODING_DEFAULTS` (REFERENCE 3's).
"""

from __future__ import annotations

from transformers import GenerationConfig

DECODING_DEFAULTS = {"gen_length": 256, "block_length": 32, "steps": 32, "threshold": 0.95}
SAVED_KEYS = (*DECODING_DEFAULTS, "mask_token_id", "eos_token_id")


def diffusion_generation_config(*, block_length: int, steps: int, threshold: float, gen_length: int,
                                mask_token_id: int, eos_token_id: int | None,
                                pad_token_id: int | None = None) -> GenerationConfig:
    """A GenerationConfig holding the block-diffusion decoding settings (extra attributes are kept by
    GenerationConfig's save / load)."""
    return GenerationConfig(block_length=block_length, steps=steps, threshold=threshold, gen_length=gen_length,
                            mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            do_sample=False)


def saved_decoding_values(model) -> dict:
    """The decoding values of `model.generation_config` (attached at `from_pretrained`), those it has."""
    config = getattr(model, "generation_config", None)
    values = {key: getattr(config, key, None) for key in SAVED_KEYS} if config is not None else {}
    return {key: value for key, value in values.items() if value is not None}


def resolve_decoding_args(model, **given) -> dict:
    """Each of `given` (gen_length, block_length, steps, threshold, mask_token_id): the value passed, else the
    checkpoint's generation_config.json, else `DECODING_DEFAULTS`; None where none of them has one."""
    saved = saved_decoding_values(model)
    return {key: value if value is not None else saved.get(key, DECODING_DEFAULTS.get(key))
            for key, value in given.items()}
