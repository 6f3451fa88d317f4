"""This process's place among ``torchrun`` workers: rank, world size, device, and the few
collective operations training needs (a single process when not launched by ``torchrun``)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["Processes", "is_first_process"]


def is_first_process() -> bool:
    """Whether this is process 0 of a ``torchrun`` job (or the only process), the one that writes."""
    return os.environ.get("RANK", "0") == "0"


class Processes:
    """This process's place among ``torchrun`` workers (a single process if not launched so)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def from_first(self, value: float) -> float:
        """``value`` as process 0 sees it, so that every process takes the same decision."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this object opened (a group the caller made is left alone), so
        that no worker exits while the group still holds connections to the others."""
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False
