"""Data-parallel training: the process group as the trainer sees it.

Under ``torchrun`` (or any initialised ``torch.distributed`` process group) every rank runs
the same training loop on its own batch. :class:`Ranks` is what
:class:`~bgflow_gate.ProgressiveKLTrainer` needs from the group: the rank and the number of
ranks, sums and minima across ranks, broadcasts, object gathers, and DDP's ``no_sync``.
``Ranks(None)`` is a single process, for which every collective is the identity, so the
trainer has one code path.

Why the trainer reduces the gradients itself
    A gated KL term may apply on one rank and not on another. DDP averages whatever each
    rank's backward pass produced and hangs when the passes differ. The trainer therefore
    runs a DDP-wrapped flow under ``no_sync()`` (local gradients only) and sums, in **one
    collective per iteration**, the KL gradient, the NLL gradient and the counts that decide
    the skip (samples kept, gated, a failure flag). Every rank then takes the same decision
    from the same global numbers and applies the same update.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "Ranks", "RankFailure", "ddp_modules", "plain_state_dict", "wrapped_state_dict", "init_from_env", "rank_seed",
    "synchronise",
]


def _dist():
    import torch.distributed as dist

    return dist


class RankFailure(RuntimeError):
    """Raised on the ranks that did nothing wrong when another rank failed (its own error
    is raised there), so that every rank stops instead of waiting for the failed one."""


def ddp_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The ``DistributedDataParallel`` wrappers inside ``module`` (name, wrapper)."""
    from torch.nn.parallel import DistributedDataParallel

    return [(name, m) for name, m in module.named_modules() if isinstance(m, DistributedDataParallel)]


def _ddp_prefixes(module: torch.nn.Module) -> list[tuple[str, str]]:
    """For every DDP wrapper inside ``module``: the key prefix of its wrapped module's state
    (``"flow.module."``) and the prefix the same keys have without the wrapper (``"flow."``)."""
    return [(f"{name}.module." if name else "module.", f"{name}." if name else "") for name, _ in ddp_modules(module)]


def _replace_prefix(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return type(state)((new + k[len(old):] if k.startswith(old) else k, v) for k, v in state.items())


def plain_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with the ``.module`` level of every DDP wrapper removed, so
    that it loads into the same model with or without DDP and with any number of ranks."""
    state = module.state_dict()
    for wrapped, plain in _ddp_prefixes(module):
        state = _replace_prefix(state, wrapped, plain)
    return state


def wrapped_state_dict(module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`plain_state_dict` for ``module`` (a state of either form)."""
    for wrapped, plain in _ddp_prefixes(module):
        if not any(k.startswith(wrapped) for k in state):
            state = _replace_prefix(state, plain, wrapped)
    return state


def rank_seed(base: int, rank: int) -> int:
    """A 63-bit seed for ``rank`` derived from ``base``: distinct, well mixed, reproducible."""
    words = np.random.SeedSequence([int(base) % 2**63, int(rank)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class Ranks:
    """The ranks of a process group, or a single process (``group=None, size 1``).

    Parameters
    ----------
    group : torch.distributed.ProcessGroup or None
        ``None``: a single process. ``Ranks.resolve`` picks the group for a trainer.
    device : torch.device, optional
        Where the tensors of collectives live. NCCL needs the rank's GPU; default: the
        current CUDA device for NCCL, the CPU otherwise.
    """

    def __init__(self, group=None, device: torch.device | None = None):
        self.group = group
        if group is None:
            self.rank, self.size, self.backend = 0, 1, None
        else:
            dist = _dist()
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
            self.backend = str(dist.get_backend(group))
        if device is None:
            nccl = self.backend == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)

    @classmethod
    def resolve(cls, process_group, module: torch.nn.Module) -> "Ranks":
        """The ranks a trainer of ``module`` works with.

        ``process_group=False``: a single process (each rank trains on its own).
        A process group: that one. ``None``: the group of a DDP wrapper inside ``module``,
        else the default group when ``torch.distributed`` is initialised, else a single
        process.
        """
        if process_group is False:
            return cls(None)
        if process_group is not None:
            return cls(process_group)
        wrappers = ddp_modules(module)
        if wrappers:
            return cls(wrappers[0][1].process_group)
        return cls.default()

    @classmethod
    def default(cls) -> "Ranks":
        """The default process group when ``torch.distributed`` is initialised, else a single process."""
        dist = _dist()
        return cls(dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)

    @property
    def distributed(self) -> bool:
        """Whether there is more than one rank."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes files."""
        return self.rank == 0

    # -- collectives (identities in a single process) ------------------------------------

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
        """``tensors`` summed (``op="sum"``) or minimised (``"min"``) across ranks, in one
        collective over a flat buffer of their common dtype; returns new tensors shaped as
        the inputs, on their devices."""
        tensors = list(tensors)
        if not self.distributed or not tensors:
            return tensors
        dist = _dist()
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, dtype) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN, group=self.group)
        out, pos = [], 0
        for t in tensors:
            out.append(flat[pos : pos + t.numel()].view(t.shape).to(t.device, t.dtype))
            pos += t.numel()
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        if not self.distributed:
            return
        dist = _dist()
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                if t.device == self.device:
                    dist.broadcast(t.data, src=dist.get_global_rank(self.group, 0), group=self.group)
                else:
                    tmp = t.data.to(self.device)
                    dist.broadcast(tmp, src=dist.get_global_rank(self.group, 0), group=self.group)
                    t.data.copy_(tmp)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        _dist().all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist = _dist()
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            _dist().barrier(group=self.group)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 while the others wait; an exception there is raised on every
        rank (the others get a ``RuntimeError`` naming it), so no rank waits forever."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # handed to the other ranks, then raised here too
                error = exc
        message = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RankFailure(f"rank 0 failed: {message}")
        return result

    # -- DDP ------------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def no_sync(wrappers: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Local gradients only: ``no_sync()`` of every DDP wrapper in ``wrappers`` (see
        :func:`ddp_modules`)."""
        with contextlib.ExitStack() as stack:
            for wrapper in wrappers:
                stack.enter_context(wrapper.no_sync())
            yield

    def shard(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``data``: every ``size``-th row from ``rank`` (disjoint)."""
        if not self.distributed:
            return data
        if len(data) < self.size:
            raise ValueError(f"the data has {len(data)} rows, fewer than the {self.size} ranks that share it")
        return data[self.rank :: self.size]


def init_from_env(device: str, timeout_minutes: float = 30.0) -> dict[str, Any | None]:
    """Initialise the default process group from ``torchrun``'s environment.

    Returns ``None`` outside ``torchrun`` (or with one process), otherwise
    ``{"rank", "world_size", "local_rank", "backend", "device"}``: NCCL on ``cuda`` with
    each process on GPU ``LOCAL_RANK``, gloo on ``cpu``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    dist = _dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                f"start at most that many processes per node (--nproc_per_node), or train with --device cpu"
            )
        torch.cuda.set_device(local_rank)
        backend, dev = "nccl", f"cuda:{local_rank}"
    else:
        backend, dev = "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": local_rank,
            "backend": backend, "device": dev}


def synchronise(ranks: "Ranks", module: torch.nn.Module, wrappers: Sequence[torch.nn.Module], seed: bool) -> None:
    """Put the ranks in step before training: rank 0's parameters and buffers to every rank
    and, with ``seed``, a random stream per rank (torch, NumPy, ``random``) seeded from a
    number drawn on rank 0, so a run is reproducible. Nothing in a single process."""
    if not ranks.distributed:
        return
    ranks.broadcast_module(module)
    for wrapper in wrappers:
        # buffers are equal now; DDP's own buffer broadcast in its first forward would be a
        # collective outside the trainer's, out of step if a rank failed before that forward
        wrapper.require_forward_param_sync = False
    if seed:
        base = ranks.broadcast(int(torch.randint(0, 2**62, ())) if ranks.is_main else None)
        value = rank_seed(base, ranks.rank)
        torch.manual_seed(value)
        np.random.seed(value % 2**32)
        random.seed(value)
