"""The CUDA-event timer of `crossvit bench`'s PyTorch rows on a GPU."""

from __future__ import annotations

from typing import Callable

import torch


class CudaEvents:
    """GPU time between two CUDA events recorded on the current stream around each call, read
    once the second has completed (`Event.synchronize`): what the device spent from the first
    launch to the last, without the host's wait for the result. For PyTorch rows, whose work
    is queued on the current stream; sessions with their own streams copy results to the host
    before returning, so those rows keep the wall clock."""

    name = "cuda-events"

    def __init__(self):
        self._start, self._end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

    def sync(self) -> None:
        torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end)
