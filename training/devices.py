"""`--device` of the training commands: parse it, refuse what this machine cannot run, and say what was used."""

import torch


def resolve_device(name: str) -> torch.device:
    """`torch.device(name)` for a `--device` value (`cpu`, `cuda`, `cuda:1`, `mps`), or a `ValueError` that says what
    is wrong and what is available, before any work starts (instead of a CUDA error deep inside the first step)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {name!r} is not a device torch knows ({error}); expected cpu, cuda or cuda:N.") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, {build}). "
                             "Run with --device cpu (the default), or on a machine with an NVIDIA GPU and a CUDA "
                             "build of torch.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: the training commands run on cpu, cuda or mps, not {device.type}.")
    return device


def parse_device_argument(parser, name: str) -> torch.device:
    """`resolve_device` for a command's `--device`: what it refuses ends the command through `parser.error` (usage,
    the reason, exit status 2), as any other bad argument does."""
    try:
        return resolve_device(name)
    except ValueError as error:
        parser.error(str(error))


def describe_device(device: torch.device) -> str:
    """What a run's summary records: `cpu (2 threads)` or `cuda:0 (NVIDIA H200)`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


__all__ = ["describe_device", "parse_device_argument", "resolve_device"]
