"""What the benchmarks share: the device and dtype they run on, and how a step is timed there.

``add_device_arguments(parser)`` gives a benchmark ``--device`` (``cpu`` or ``cuda``) and ``--dtype``
(``float32``, ``bfloat16``; default: bfloat16 on CUDA, float32 on the CPU); ``device_and_dtype(args)``
reads them back. ``alternate`` times step functions in turn, each the median of its repeats: with CUDA
events on a GPU (the kernels' time, the host waiting only once per step), with ``perf_counter`` on the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["add_device_arguments", "alternate", "device_and_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def alternate(steps: list[Callable[[], object]], repeats: int, warmup: int = 2,
              device: torch.device | str = "cpu") -> list[float]:
    """Median seconds of each step function, run alternately ``repeats`` times after ``warmup`` rounds (the
    median, not the mean: a step slowed by another process on the machine does not move it)."""
    cuda = torch.device(device).type == "cuda"
    times = [[] for _ in steps]
    for round_ in range(repeats + warmup):
        for step, record in zip(steps, times):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                step()
                seconds = time.perf_counter() - begin
            if round_ >= warmup:
                record.append(seconds)
    return [statistics.median(record) for record in times]
