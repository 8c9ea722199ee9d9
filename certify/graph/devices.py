"""Where the torch computation runs: the CPU (the default) or a CUDA device.

Every device computes in float64, so a certificate means the same wherever it was made;
only rounding in the last bits may differ. The numpy checker (``certify.check.claims``) always runs
on the CPU: results come back there.
"""

from __future__ import annotations

import torch

from certify.graph.inputs import InputError

HELP = "use 'cpu' or 'cuda[:N]' (--device cpu on the command line)"


class DeviceError(InputError):
    """A device certify cannot run on here; the message says what to pass instead (an
    ``InputError``, so the command line reports it as an input error)."""


def resolve(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has: ``None`` is the CPU, ``"cuda"``
    the current CUDA device with its index (so that the certificate names it).

    Raises ``DeviceError`` for anything but the CPU or a CUDA device, and for a CUDA device
    this torch or this machine lacks (checked here, not at the first tensor deep inside a
    bound).
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise DeviceError(f"device {device!r} is not a device name; {HELP}") from None
    elif isinstance(device, torch.device):
        resolved = device
    else:
        raise DeviceError(f"device must be a string or a torch.device, got "
                          f"{type(device).__name__} {device!r}; {HELP}")
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise DeviceError(f"device {str(resolved)!r}: certify computes on the CPU or on CUDA, "
                          f"not on {resolved.type}; {HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(resolved)!r}: this torch has no CUDA device "
                          "(torch.cuda.is_available() is False); use 'cpu' (--device cpu), "
                          "or install a CUDA build of torch")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= count:
        raise DeviceError(f"device {str(resolved)!r}: this machine has {count} CUDA "
                          f"device(s), cuda:0 to cuda:{count - 1}; pick one of them")
    return torch.device("cuda", index)


def describe(device: torch.device | str | None) -> str:
    """The device for a certificate: ``"cpu"`` or e.g. ``"cuda:0 (NVIDIA H200)"``."""
    device = resolve(device)
    if device.type == "cpu":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(device)})"
