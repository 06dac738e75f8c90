"""Which examples a rank trains on at each step: a pure function of (seed, epoch, rank, step),
so a resumed run draws exactly the batches the uninterrupted run would have drawn."""

from __future__ import annotations

import torch

from .config import ConfigError


class ShardedSampler:
    """Seeded permutation per epoch, rank r takes positions r, r+P, ...; equal shard sizes."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        per_rank = size // world_size
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {batch_size} examples per rank x {world_size} ranks exceeds the "
                f"task's {size} training examples; use a smaller batch_size"
            )
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.size, generator=gen)
            self._perm = perm[self.rank : self.world_size * (self.size // self.world_size) : self.world_size]
            self._epoch = epoch
        assert self._perm is not None
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]
