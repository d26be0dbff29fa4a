"""What the benchmarks share: the device and dtype they run on, the model shapes, and how a step is timed there.

``add_device_arguments(parser)`` gives a benchmark ``--device`` (``cpu`` or ``cuda``) and ``--dtype``
(``float32``, ``bfloat16``; default: bfloat16 on CUDA, float32 on the CPU); ``device_and_dtype(args)``
reads them back (``describe`` says them in words); ``build_on`` makes a model there, ``on_device`` moves a
batch there. ``parse_with_shapes`` adds
``--shape``: the CPU-sized defaults, or ``llava7b``, a LLaVA-1.5-7B-shaped decoder slice (``LLAVA_7B``).
``step_seconds`` times one call: with CUDA events on a GPU (the step's span on the device, host stalls
included, the host waiting once at its end), with ``perf_counter`` on the CPU. ``alternate`` times step
functions in turn, each the median of its repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["LLAVA_7B", "add_device_arguments", "alternate", "build_on", "describe", "device_and_dtype", "on_device",
           "parse_with_shapes", "step_seconds"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# LLaVA-1.5-7B: a Vicuna-7B decoder (width 4096, 32 heads, SwiGLU MLP 11008) fed 576 visual tokens per image (a 24 x 24
# patch grid: 336-pixel images, 14-pixel patches); the bundled example's small vision tower stands in for CLIP ViT-L
LLAVA_7B = {"hidden": 4096, "heads": 32, "intermediate": 11008, "image_size": 336, "patch_size": 14}


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models train")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="parameter dtype (default: bfloat16 on cuda, float32 on cpu)")


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """The ``--device`` and ``--dtype`` a benchmark was given; a CUDA device that is absent is refused."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    return torch.device(args.device), dtype


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """``bfloat16 on NVIDIA H100 80GB HBM3``, ``float32 on 2 CPU threads``: what a benchmark ran on, for its output."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return f"{str(dtype).removeprefix('torch.')} on {where}"


def parse_with_shapes(parser, shapes: dict[str, dict], argv=None):
    """``parser``'s arguments, with ``--shape`` (the first of ``shapes`` by default) setting the defaults of the
    arguments it names; a flag given explicitly still wins."""
    parser.add_argument("--shape", default=next(iter(shapes)), choices=tuple(shapes),
                        help="sets the defaults of: " + ", ".join(sorted({k for v in shapes.values() for k in v})))
    parser.set_defaults(**shapes[parser.parse_known_args(argv)[0].shape])
    return parser.parse_args(argv)


def build_on(device: torch.device, dtype: torch.dtype, build: Callable[..., torch.nn.Module], **kwargs):
    """``build(**kwargs)`` with its parameters made on ``device`` (no copy from the host) and cast to ``dtype``."""
    with torch.device(device):
        return build(**kwargs).to(dtype)


def on_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A batch on ``device``, its floating-point tensors (pixels) in ``dtype``."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def step_seconds(step: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``step`` takes: between CUDA events recorded around it on a GPU (the device's span of the
    step: its kernels and any wait for the host), by ``perf_counter`` on the CPU."""
    if torch.device(device).type != "cuda":
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def alternate(steps: list[Callable[[], object]], repeats: int, warmup: int = 2,
              device: torch.device | str = "cpu") -> list[float]:
    """Median seconds of each step function, run alternately ``repeats`` times after ``warmup`` rounds (the
    median, not the mean: a step slowed by another process on the machine does not move it)."""
    times = [[] for _ in steps]
    for round_ in range(repeats + warmup):
        for step, record in zip(steps, times):
            seconds = step_seconds(step, device)
            if round_ >= warmup:
                record.append(seconds)
    return [statistics.median(record) for record in times]
