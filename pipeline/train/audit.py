"""The worker loop's test instrumentation, on only with `train.audit` (AuditConfig): a fault drill, a guard drill (NaN
in a weight), and at every checkpoint the proof that DDP ranks stay bitwise in sync and read disjoint data. Costs an
all-gather of every sample key per checkpoint, so real runs leave it off (train.audit: null), and every method then
does nothing."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import ray
import torch
import torch.distributed as dist

from pipeline.train.config import AuditConfig
from pipeline.train.step import TrainParts, unwrap


def parameter_fingerprint(parts: TrainParts) -> torch.Tensor:
    """(2 * tensors,) float64 sums and absolute sums of every parameter and buffer of G and D."""
    values = []
    for module in (unwrap(parts.net), unwrap(parts.discriminator)):
        for tensor in [*module.parameters(), *module.buffers()]:
            t = tensor.detach().double()
            values += [t.sum(), t.abs().sum()]
    return torch.stack(values)


class Audit:
    def __init__(self, cfg: AuditConfig | None, rank: int, world_size: int, resumed: bool):
        self.cfg, self.rank, self.world_size, self.resumed = cfg, rank, world_size, resumed
        self.keys: set[tuple[int, str]] = set()  # (epoch, key) read since the last checkpoint

    def before_step(self, step: int, last_checkpoint: int, parts: TrainParts) -> None:
        if self.cfg and step == self.cfg.fail_at_step and self.rank == 0 and not self.resumed:
            raise RuntimeError(f"fault drill: train.audit.fail_at_step={step} (a restart resumes from step "
                               f"{last_checkpoint})")
        if self.cfg and step == self.cfg.nan_at_step:  # on every rank, as DDP keeps the weights equal
            with torch.no_grad():
                next(unwrap(parts.net).parameters()).view(-1)[0] = float("nan")

    def read(self, epoch: int, keys: Iterable[str]) -> None:
        if self.cfg:
            self.keys.update((epoch, key) for key in keys)

    def at_checkpoint(self, parts: TrainParts) -> dict[str, float]:
        """Collective (all ranks call it): are the ranks' weights bitwise equal, on how many nodes do they run,
        and how many samples did two ranks read in the same epoch (must be 0)."""
        if not self.cfg:
            return {}
        keys, self.keys = self.keys, set()
        node_id = ray.get_runtime_context().get_node_id()
        if self.world_size == 1 or not dist.is_initialized():
            return {"ranks_in_sync": 1.0, "nodes": 1.0, "data_overlap": 0.0, "data_samples": float(len(keys))}
        mine = parameter_fingerprint(parts)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        seen: list[Any] = [None] * self.world_size
        dist.all_gather_object(seen, (node_id, sorted(keys)))
        readers: dict[tuple[int, str], int] = defaultdict(int)
        for _, rank_keys in seen:
            for key in rank_keys:
                readers[tuple(key)] += 1
        return {"ranks_in_sync": float(all(torch.equal(f, everyone[0]) for f in everyone)),
                "nodes": float(len({node for node, _ in seen})),
                "data_overlap": float(sum(1 for n in readers.values() if n > 1)),
                "data_samples": float(sum(len(rank_keys) for _, rank_keys in seen))}
