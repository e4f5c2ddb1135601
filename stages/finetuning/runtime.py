"""Facts about the processes this run trains in, computed once at the start (nanoGPT's top block): which process
this is, how many there are, and whether a CUDA GPU is there. The values are those `torchrun`, `accelerate launch`
and stages/finetuning/launch.py put in the environment, which is also what accelerate's PartialState reads."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("pipeline")


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

    def shards_base(self, parallelism: str) -> bool:
        """Whether the base is sharded over this run's processes (`train.parallelism: fsdp`, more than one)."""
        return parallelism == "fsdp" and self.world_size > 1

    def use_cpu_cores(self) -> None:
        """On CPU, give each process its share of the cores: `accelerate launch` sets OMP_NUM_THREADS=1 when it is
        unset, which halves CPU training speed on two cores."""
        if not self.cuda:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // self.world_size))

    def cap_gpu_memory(self, gib: float | None) -> None:
        """`train.gpu_memory_gib`: this process allocates at most `gib` of its GPU, as if the card were that small, so
        a test of what fits a smaller card is honest on a large one. CPU runs ignore it (with a warning)."""
        if gib is None:
            return
        if not self.cuda:
            log.warning("train.gpu_memory_gib %g: a CPU run has no GPU budget to set; ignored", gib)
            return
        card = torch.cuda.get_device_properties(self.local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / card), self.local_rank)
        log.info("GPU memory budget: %g GiB of the card's %.1f GiB per process", gib, card / 2**30)
