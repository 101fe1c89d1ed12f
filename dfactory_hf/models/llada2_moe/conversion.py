"""Checkpoint layouts of LLaDA2-MoE routed experts, and conversion between them.

Three layouts of the routed experts of MoE layer `l` (`I` = moe_intermediate_size, `H` = hidden_size):

| layout | keys under `model.layers.{l}.mlp.experts.` | shapes |
|---|---|---|
| hub (per expert) | `{e}.gate_proj.weight`, `{e}.up_proj.weight`, `{e}.down_proj.weight` | [I, H], [I, H], [H, I] |
| merged (dFactory) | `gate_proj`, `up_proj`, `down_proj` | [E, I, H], [E, I, H], [E, H, I] |
| fused (in memory) | `gate_up_proj`, `down_proj` | [E, 2I, H], [E, H, I] |

`from_pretrained` loads any of them through transformers' checkpoint conversion mapping (registered below for
`model_type="llada2_moe"`), after checking every tensor's presence and shape from the safetensors headers
(validation.py) so a bad checkpoint fails with the key and both shapes instead of loading re-initialised tensors. `save_pretrained`
always writes the hub layout and, when the source (a directory, or a hub id through huggingface_hub's cache) had
modeling `*.py` files and the config an `auto_map`, copies them alongside so the hub's remote code still loads
the result; a `generation_config.json` (block-diffusion decoding defaults) is read into `model.generation_config`
and written back.

`convert_checkpoint` (CLI: `dfactory-hf convert --to {hub,merged} SRC DST`) rewrites a checkpoint directory
tensor by tensor without building the model, one layer's experts in memory at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts\.)(?P<rest>.+)$")
_HUB_REST = re.compile(r"^(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")

logger = logging.getLogger(__name__)


def hub_expert_conversions() -> list[WeightConverter]:
    """Per-expert hub keys <-> fused 3D tensors (also used in reverse by `save_pretrained`)."""
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def merged_expert_conversions() -> list[WeightConverter]:
    """dFactory's merged keys -> fused; its `down_proj` [E, H, I] already has the fused name and shape.

    The lookahead keeps PEFT off our own adapters: when it loads a LoRA adapter, PEFT 0.21 turns each source
    pattern `<prefix>.gate_proj$` into `<prefix>.lora_A.*` and would read the routed experts' fused-layout adapters
    (`mlp.experts.lora_A.weight`) as merged-layout ones; `mlp.experts(?=...)` can precede only the merged keys."""
    prefix = r"mlp.experts(?=\.gate_proj$|\.up_proj$)"
    return [
        WeightConverter(
            source_patterns=[prefix + ".gate_proj$", prefix + ".up_proj$"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[Concatenate(dim=1)],
        )
    ]


def register_conversions() -> None:
    register_checkpoint_conversion_mapping(
        "llada2_moe", hub_expert_conversions() + merged_expert_conversions(), overwrite=True
    )


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoint headers and checking expert tensors
# ---------------------------------------------------------------------------------------------------------


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor key of a safetensors checkpoint directory to the file holding it."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    key_to_file = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            key_to_file.update({key: file for key in handle.keys()})
    return key_to_file


def checkpoint_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor, read from the safetensors headers only."""
    by_file = defaultdict(list)
    for key, file in checkpoint_files(directory).items():
        by_file[file].append(key)
    shapes = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for key in keys:
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _group_expert_keys(keys) -> dict[int, dict[str, str]]:
    """{layer: {rest_of_key: full_key}} for every key under `layers.{l}.mlp.experts.`."""
    layers: dict[int, dict[str, str]] = defaultdict(dict)
    for key in keys:
        match = _EXPERT_KEY.match(key)
        if match:
            layers[int(match["layer"])][match["rest"]] = key
    return layers


def detect_layout(rests) -> str:
    rests = set(rests)
    if any(_HUB_REST.match(rest) for rest in rests):
        return "hub"
    if "gate_up_proj" in rests:
        return "fused"
    return "merged"


def validate_expert_tensors(shapes: dict[str, tuple[int, ...]], config, source: str = "checkpoint") -> None:
    """Raise ValueError naming the key, expected and found shape for any missing, extra or mis-shaped expert."""
    num_experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
    per_expert = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    sizes = f"config: num_experts={num_experts}, moe_intermediate_size={inter}, hidden_size={hidden}"
    problems = []
    for layer, rests in sorted(_group_expert_keys(shapes).items()):
        prefix = _EXPERT_KEY.match(next(iter(rests.values())))["prefix"]
        if layer >= config.num_hidden_layers or not config.is_moe_layer(layer):
            kind = "does not exist" if layer >= config.num_hidden_layers else "is a dense layer"
            problems.append(f"unexpected expert tensor {next(iter(rests.values()))}: layer {layer} {kind}")
            continue
        layout = detect_layout(rests)
        if layout == "hub":
            expected = {f"{e}.{proj}.weight": shape for e in range(num_experts) for proj, shape in per_expert.items()}
        elif layout == "fused":
            expected = {"gate_up_proj": (num_experts, 2 * inter, hidden), "down_proj": (num_experts, hidden, inter)}
        else:
            expected = {proj: (num_experts, *shape) for proj, shape in per_expert.items()}
        found_experts = {int(m["expert"]) for m in map(_HUB_REST.match, rests) if m}
        if layout == "hub" and found_experts and max(found_experts) + 1 != num_experts:
            problems.append(
                f"layer {layer} holds {max(found_experts) + 1} experts in the {source} but config.num_experts is "
                f"{num_experts}"
            )
        for rest, shape in expected.items():
            if rest not in rests:
                problems.append(f"missing expert tensor {prefix}{rest} (expected shape {shape})")
            elif tuple(shapes[rests[rest]]) != shape:
                problems.append(f"{prefix}{rest}: expected shape {shape}, found {tuple(shapes[rests[rest]])}")
        for rest in sorted(set(rests) - set(expected)):
            problems.append(f"unexpected expert tensor {prefix}{rest} (shape {tuple(shapes[rests[rest]])})")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError(f"Expert tensors of {source} do not match the config ({sizes}):\n  " + "\n  ".join(shown))


# ---------------------------------------------------------------------------------------------------------
# The model mixin: validation before load, hub layout and modeling files at save
# ---------------------------------------------------------------------------------------------------------


class LLaDA2MoeCheckpointMixin:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if pretrained_model_name_or_path is not None and Path(pretrained_model_name_or_path).is_dir():
            from .validation import readable_shapes, refuse_incomplete_training_checkpoint, validate_checkpoint_tensors

            directory = Path(pretrained_model_name_or_path)
            refuse_incomplete_training_checkpoint(directory)
            config = kwargs.get("config")
            if config is None or isinstance(config, (str, os.PathLike)):
                config = cls.config_class.from_pretrained(config or directory)
            if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
                validate_checkpoint_tensors(readable_shapes(directory), config, cls, source=str(directory))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
        source = str(pretrained_model_name_or_path)
        hub = dict(revision=kwargs.get("revision") or getattr(model.config, "_commit_hash", None),
                   cache_dir=kwargs.get("cache_dir"))
        # Not a GenerationMixin, so transformers does not read generation_config.json: the block-diffusion decoding
        # defaults DiffusionTrainer saved there, which generate() reads from here (generation/defaults.py).
        model.generation_config = _saved_generation_config(source, **hub)
        if getattr(model.config, "auto_map", None) and not Path(source).is_dir():
            # Loaded by hub id with our classes, so transformers fetched no remote code; the saved config keeps
            # its auto_map, so the files it names come along from the hub's cache (downloaded if not there).
            model._remote_code_directory = _remote_code_snapshot(source, **hub)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Whatever layout it was loaded from, write the hub's per-expert layout.
        self._weight_conversions = hub_expert_conversions()
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            source = getattr(self, "_remote_code_directory", None) or getattr(self.config, "_name_or_path", "")
            copy_remote_code(source, save_directory, self.config)
            if getattr(self, "generation_config", None) is not None:
                self.generation_config.save_pretrained(save_directory)


def _saved_generation_config(source: str, **hub):
    from transformers import GenerationConfig

    if Path(source).is_dir() and not (Path(source) / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(source, **hub)
    except OSError:  # no generation_config.json in the hub repo (or not reachable): the built-in defaults apply
        return None


def _remote_code_snapshot(repo_id: str, **hub) -> str | None:
    """The local folder of the hub repo's `*.py` files (huggingface_hub's cache), or None with a warning."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=["*.py"], **hub)
    except (OSError, EntryNotFoundError) as error:
        logger.warning("%s: its config.json names remote code (auto_map) but the *.py files could not be fetched "
                       "(%s); checkpoints saved from it load with `import dfactory_hf`, not with "
                       "trust_remote_code=True alone.", repo_id, str(error).splitlines()[0] if str(error) else error)
        return None


def copy_remote_code(source_directory, save_directory, config) -> list[str]:
    """Copy the source's modeling `*.py` files when its config points at them through `auto_map`."""
    if not getattr(config, "auto_map", None) or not source_directory or not Path(source_directory).is_dir():
        return []
    copied = []
    for file in sorted(Path(source_directory).glob("*.py")):
        destination = Path(save_directory) / file.name
        if file.resolve() != destination.resolve():
            shutil.copy2(file, destination)
            copied.append(file.name)
    return copied


def fused_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any expert layout -> the in-memory fused one (`gate_up_proj`, `down_proj`); other keys unchanged."""
    layers = _group_expert_keys(tensors)
    expert_keys = {key for rests in layers.values() for key in rests.values()}
    out = {key: value for key, value in tensors.items() if key not in expert_keys}
    for rests in layers.values():
        prefix = _EXPERT_KEY.match(next(iter(rests.values())))["prefix"]
        layout = detect_layout(rests)
        if layout == "hub":
            gate, up, down = _stack_hub_experts(prefix, rests, tensors.__getitem__)
        else:
            gate, up, down = _expert_tensors(layout, prefix, tensors.__getitem__)
        out[prefix + "gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[prefix + "down_proj"] = down
    return out


def load_checkpoint_weights(model, directory: str | os.PathLike) -> None:
    """Load a safetensors checkpoint directory (any expert layout) into an existing model, strictly.

    `Trainer` resumes with a plain `load_state_dict` of the saved file, which would silently drop the hub
    layout's per-expert keys (and leave the experts untrained); this converts them first.
    """
    key_to_file = checkpoint_files(directory)
    tensors = {}
    for file in sorted(set(key_to_file.values())):
        with safe_open(file, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    state = fused_state_dict(tensors)
    expected = model.state_dict()
    wrong = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
             for key, value in state.items() if key in expected and value.shape != expected[key].shape]
    if wrong:
        raise ValueError(f"Checkpoint {directory} was written by another model (shapes differ: {'; '.join(wrong[:5])}); "
                         "resume or load it with the model configuration it was trained with.")
    # Buffers that are not saved (rotary inv_freq) stay as they are.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"Checkpoint {directory} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")


# ---------------------------------------------------------------------------------------------------------
# Offline conversion between layouts (no model is built)
# ---------------------------------------------------------------------------------------------------------


def _stack_hub_experts(prefix: str, rests, read) -> list[torch.Tensor]:
    """A hub layer's per-expert keys -> [E, ...] gate, up and down tensors (`read(key)` gives a tensor)."""
    num_experts = 1 + max(int(_HUB_REST.match(rest)["expert"]) for rest in rests)
    return [torch.stack([read(f"{prefix}{e}.{proj}.weight") for e in range(num_experts)]) for proj in PROJECTIONS]


def _expert_tensors(layout: str, prefix: str, read) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [E, I, H], up [E, I, H], down [E, H, I] of one layer, read from any layout."""
    if layout == "merged":
        return read(prefix + "gate_proj"), read(prefix + "up_proj"), read(prefix + "down_proj")
    if layout == "fused":
        gate, up = read(prefix + "gate_up_proj").chunk(2, dim=1)
        return gate.contiguous(), up.contiguous(), read(prefix + "down_proj")
    raise AssertionError(layout)


def _write_experts(target: str, prefix: str, gate, up, down) -> dict[str, torch.Tensor]:
    if target == "merged":
        return {prefix + "gate_proj": gate, prefix + "up_proj": up, prefix + "down_proj": down}
    out = {}
    for expert in range(gate.shape[0]):
        out[f"{prefix}{expert}.gate_proj.weight"] = gate[expert].clone()
        out[f"{prefix}{expert}.up_proj.weight"] = up[expert].clone()
        out[f"{prefix}{expert}.down_proj.weight"] = down[expert].clone()
    return out


class _ShardWriter:
    """Writes tensors into numbered safetensors shards of at most `max_shard_bytes`, then an index."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self.pending[key] = tensor.contiguous()
            self.pending_bytes += size

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.directory / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        total = len(self.shards)
        if total == 1:
            (self.directory / "shard-00000.tmp").rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for number, keys in enumerate(self.shards):
            name = f"model-{number + 1:05d}-of-{total:05d}.safetensors"
            (self.directory / f"shard-{number:05d}.tmp").rename(self.directory / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike, *, to: str,
                       max_shard_size_gb: float = 5.0) -> dict[str, int]:
    """Rewrite the checkpoint at `source` into `destination` with experts in layout `to` ("hub" or "merged").

    Non-weight files (config, tokenizer, modeling code) are copied unchanged. Returns counts for the report.
    """
    if to not in ("hub", "merged"):
        raise ValueError(f"--to ({to!r}) must be 'hub' or 'merged'.")
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise ValueError(f"SRC ({source}) is not a directory holding a safetensors checkpoint.")
    if destination.exists() and any(destination.iterdir()):
        raise ValueError(f"DST ({destination}) exists and is not empty; choose a new directory.")
    key_to_file = checkpoint_files(source)
    if not key_to_file:
        raise ValueError(f"SRC ({source}) holds no *.safetensors files.")
    config_file = source / "config.json"
    if config_file.is_file():
        from .configuration_llada2_moe import LLaDA2MoeConfig

        config = LLaDA2MoeConfig.from_pretrained(source)
        validate_expert_tensors(checkpoint_shapes(source), config, source=str(source))
    destination.mkdir(parents=True, exist_ok=True)
    handles: dict[Path, object] = {}

    def read(key: str) -> torch.Tensor:
        file = key_to_file[key]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(key)

    writer = _ShardWriter(destination, int(max_shard_size_gb * 2**30))
    expert_layers = _group_expert_keys(key_to_file)
    expert_keys = {key for rests in expert_layers.values() for key in rests.values()}
    written_layers = 0
    for key in sorted(key_to_file):
        if key not in expert_keys:
            writer.add({key: read(key)})
    for layer, rests in sorted(expert_layers.items()):
        prefix = _EXPERT_KEY.match(next(iter(rests.values())))["prefix"]
        layout = detect_layout(rests)
        if layout == to:
            writer.add({full: read(full) for full in rests.values()})
        elif layout == "hub":
            writer.add(_write_experts(to, prefix, *_stack_hub_experts(prefix, rests, read)))
        else:
            writer.add(_write_experts(to, prefix, *_expert_tensors(layout, prefix, read)))
        written_layers += 1
    writer.finish()
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy2(file, destination / file.name)
    return {"tensors_in": len(key_to_file), "expert_layers": written_layers, "shards_out": len(writer.shards)}
