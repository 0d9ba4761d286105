"""Batches of tensor training data that a checkpoint can resume exactly."""

from __future__ import annotations

import torch

__all__ = ["TensorBatches", "DataSlots", "check_finite_rows"]


class TensorBatches:
    """Draws batches of rows of ``data`` without replacement, reshuffling after every pass.

    The order comes from torch's global random number generator, and the order and the
    position in it are part of :meth:`state_dict`, so a resumed run draws the same
    batches. A batch that runs past the end of a pass continues into the next one.
    """

    def __init__(self, data: torch.Tensor):
        if len(data) == 0:
            raise ValueError("the training data are empty")
        self.data = data
        self.order = torch.randperm(len(data))
        self.position = 0

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, n: int) -> torch.Tensor:
        """The next ``n`` rows."""
        picks = []
        while n > 0:
            if self.position == len(self.order):
                self.order, self.position = torch.randperm(len(self.data)), 0
            take = self.order[self.position : self.position + n]
            picks.append(take)
            self.position += len(take)
            n -= len(take)
        index = picks[0] if len(picks) == 1 else torch.cat(picks)
        return self.data[index.to(self.data.device)]

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if len(state["order"]) != len(self.data):
            raise ValueError(
                f"the checkpoint's data order covers {len(state['order'])} rows, the data have {len(self.data)}; "
                f"resume with the same training data"
            )
        self.order, self.position = state["order"].clone(), int(state["position"])


class DataSlots:
    """The samplers a trainer draws from, by slot (``"data"``, ``"test"``), kept across
    ``train()`` calls with the same data so that passes over it continue. Under a process
    group a tensor is sharded: each rank draws from its own disjoint rows."""

    def __init__(self, ranks):
        self.ranks = ranks
        self._cache: dict[str, tuple[int, object]] = {}  # slot -> (id(data), sampler)
        self._pending: dict[str, dict] = {}  # states from a checkpoint, for samplers not built yet

    def sampler(self, data, slot: str):
        """The sampler of ``data`` for ``slot`` (``None`` without data)."""
        if data is None:
            return None
        check_finite_rows(data, slot)
        key, sampler = self._cache.get(slot, (None, None))
        if key != id(data):  # the cached sampler holds the data, so its id stays unique
            sampler = TensorBatches(self.ranks.shard(data)) if isinstance(data, torch.Tensor) else data
            pending = self._pending.pop(slot, None)
            if pending is not None and hasattr(sampler, "load_state_dict"):
                sampler.load_state_dict(pending)
            self._cache[slot] = (id(data), sampler)
        return sampler

    def samplers(self) -> dict:
        return {slot: sampler for slot, (_, sampler) in self._cache.items()}

    def state_dict(self) -> dict[str, dict]:
        state = dict(self._pending)
        for slot, (_, sampler) in self._cache.items():
            if hasattr(sampler, "state_dict"):
                state[slot] = sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Forget the samplers; the states apply when each is built again."""
        self._cache, self._pending = {}, dict(state)


def check_finite_rows(data, name: str) -> None:
    """Tensor data with non-finite rows make every step non-finite: an error naming the rows."""
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        return
    bad = torch.nonzero(~torch.isfinite(data.reshape(len(data), -1)).all(1)).reshape(-1)
    if len(bad):
        rows = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"{name} has {len(bad)} row(s) with NaN or inf (rows {rows}) of {len(data)}; remove them, "
            f"e.g. {name}[torch.isfinite({name}).all(1)]"
        )
