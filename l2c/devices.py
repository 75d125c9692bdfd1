"""The one device picker: `auto` is this rank's GPU (LOCAL_RANK, as torchrun and Ray Train set it) or the CPU."""

from __future__ import annotations

import os

from l2c.errors import L2CError


def pick_device(device=None):
    """A `torch.device` for `device` ("auto" or None: the local GPU if there is one, else the CPU)."""
    import torch

    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise L2CError(f"--device {device}: no CUDA device is available")
    return device
