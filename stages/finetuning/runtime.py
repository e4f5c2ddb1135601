"""Facts about the processes this run trains in, computed once at the start (nanoGPT's top block): which process
this is, how many there are, and whether a CUDA GPU is there. The values are those `torchrun`, `accelerate launch`
and stages/finetuning/launch.py put in the environment, which is also what accelerate's PartialState reads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    cuda: bool

    @classmethod
    def detect(cls) -> Runtime:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            cuda=torch.cuda.is_available(),
        )

    @property
    def is_main(self) -> bool:
        """Only this process writes outs and metrics."""
        return self.rank == 0

    def use_cpu_cores(self) -> None:
        """On CPU, give each process its share of the cores: `accelerate launch` sets OMP_NUM_THREADS=1 when it is
        unset, which halves CPU training speed on two cores."""
        if not self.cuda:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // self.world_size))
