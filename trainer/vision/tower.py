"""Vision towers: any transformers vision model from a local path, or from a config with random weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from l2c.config import ConfigError
from l2c.trainer.vision.config import VisionConfig

# Full two-tower checkpoints whose vision half we take.
_VISION_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}


@dataclass
class ImageSpec:
    """How images are prepared for a tower: resize (shortest edge or exact h,w), optional crop, normalise."""

    resize: int | list[int]  # int: shortest edge; [h, w]: exact size
    crop: list[int] | None  # [h, w] center crop after resize, or None
    image_mean: list[float]
    image_std: list[float]

    @property
    def image_size(self) -> int:
        hw = self.crop or (self.resize if isinstance(self.resize, list) else [self.resize, self.resize])
        return int(hw[0])

    def to_dict(self) -> dict:
        return asdict(self)


def image_spec_from_processor(proc) -> ImageSpec:
    """Read resize/crop/normalisation from a transformers image processor (CLIP, SigLIP, DINOv2, ViT)."""
    size = getattr(proc, "size", None) or {}
    size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
    if "shortest_edge" in size and size["shortest_edge"]:
        resize: int | list[int] = int(size["shortest_edge"])
    else:
        resize = [int(size["height"]), int(size["width"])]
    crop = None
    if getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None):
        cs = proc.crop_size
        crop = [int(cs["height"]), int(cs["width"])]
    return ImageSpec(resize, crop, [float(x) for x in proc.image_mean], [float(x) for x in proc.image_std])


def _vision_config_of(config):
    return getattr(config, "vision_config", None) or config


def build_vision_tower(cfg: VisionConfig) -> tuple[nn.Module, ImageSpec, object | None]:
    """(tower, image spec, image processor or None) for a local model directory or a random-weight config."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    if cfg.pretrained:
        path = Path(cfg.pretrained).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model.vision.pretrained={cfg.pretrained!r} is not a local model directory"
            )
        config = AutoConfig.from_pretrained(path)
        cls_name = _VISION_CLASSES.get(config.model_type)
        if cls_name:  # a two-tower checkpoint: load only its vision half
            tower = getattr(transformers, cls_name).from_pretrained(path)
        else:
            tower = AutoModel.from_pretrained(path)
        try:
            proc = AutoImageProcessor.from_pretrained(path)
            spec = image_spec_from_processor(proc)
        except (OSError, ValueError):
            proc = None
            size = int(_vision_config_of(config).image_size)
            spec = ImageSpec(size, [size, size], list(cfg.image_mean), list(cfg.image_std))
    else:
        kwargs = dict(cfg.config)
        model_type = kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, **kwargs)
        tower = AutoModel.from_config(_vision_config_of(config))
        size = int(_vision_config_of(config).image_size)
        spec = ImageSpec(size, [size, size], list(cfg.image_mean), list(cfg.image_std))
        proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        proc = proc_cls(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=spec.image_mean,
            image_std=spec.image_std,
        )
    if cfg.gradient_checkpointing:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tower, spec, proc


def tower_width(tower: nn.Module) -> int:
    c = tower.config
    return int(getattr(c, "hidden_size", None) or getattr(c, "hidden_sizes", [0])[-1])


def pooled_output(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's pooled image feature (pooler output, else the first token of the last layer)."""
    out = tower(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.last_hidden_state[:, 0]
    return pooled.flatten(1)


def transformer_blocks(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of blocks (the longest ModuleList named `layer`, `layers`, `blocks` or `stages`)."""
    best = None
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers", "blocks", "stages"):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(tower).__name__}")
    return best


def block_index_of(tower: nn.Module) -> dict[str, int]:
    """Parameter name -> depth: 0 embeddings, i+1 block i, n+1 everything after the blocks."""
    blocks = transformer_blocks(tower)
    n = len(blocks)
    block_params = {id(p): i + 1 for i, b in enumerate(blocks) for p in b.parameters()}
    depth = {}
    seen_blocks = False
    for name, p in tower.named_parameters():
        if id(p) in block_params:
            depth[name] = block_params[id(p)]
            seen_blocks = True
        else:
            depth[name] = n + 1 if seen_blocks else 0
    return depth


def freeze_first_blocks(tower: nn.Module, k: int) -> int:
    """Freeze the embeddings and the first `k` blocks; returns the number of frozen parameters."""
    if k <= 0:
        return 0
    n = len(transformer_blocks(tower))
    if k > n:
        raise ConfigError(f"model.vision.freeze_blocks={k} but the tower has only {n} blocks")
    depth = block_index_of(tower)
    frozen = 0
    for name, p in tower.named_parameters():
        if depth[name] <= k:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
