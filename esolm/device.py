"""Device selection: the only place that names an accelerator. Everything runs on CPU."""

from __future__ import annotations

import torch

ACCEL_DEVICE_TYPE = "cuda"


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> the GPU when one is available, else the CPU; or any torch device string."""
    if name == "auto":
        return torch.device(ACCEL_DEVICE_TYPE if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == ACCEL_DEVICE_TYPE and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this machine has no CUDA GPU; "
                         "use --device cpu or auto")
    return device


def is_accelerator(device: torch.device) -> bool:
    return device.type == ACCEL_DEVICE_TYPE


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (before reading a clock); a no-op on CPU."""
    if is_accelerator(device):
        torch.cuda.synchronize(device)
