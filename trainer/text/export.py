"""Writing the fine-tuned text encoder: the LoRA adapter, and a merged plain transformers directory with
`l2c_text_encoder.json`, which `embed-captions` and `eval-cra` load as any other model."""

from __future__ import annotations

from pathlib import Path

import torch

from l2c.atomic import replace_dir, tmp_dir_for
from l2c.pipeline.encoder import save_encoder_settings


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def export_text_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, settings: dict,
                      adapter_dir: str | Path | None = None) -> torch.nn.Module:  # fmt: skip
    """Save `model` (a peft model is saved as an adapter first, then merged) as a transformers directory.

    `settings` (pooling, bidirectional, max_length, ...) go to `l2c_text_encoder.json`. Both directories
    appear whole or not at all. Returns the merged model (the peft wrapper is consumed by the merge).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        if adapter_dir is not None:
            adapter_dir = Path(adapter_dir)
            tmp = tmp_dir_for(adapter_dir)
            model.save_pretrained(tmp)
            replace_dir(tmp, adapter_dir)
        model = model.merge_and_unload()
    tmp = tmp_dir_for(Path(out_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_encoder_settings(tmp, **settings)
    replace_dir(tmp, out_dir)
    return model
