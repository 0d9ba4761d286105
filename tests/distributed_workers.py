"""Processes for the data-parallel tests: two gloo ranks on the CPU, started with ``spawn``.

Each worker writes what the test checks to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from bgflow_gate import ConstantSchedule, ProgressiveKLTrainer, bg
from bgflow_gate.systems.toy import steep_well_generator
from bgflow_gate.targets import generator_target


def spawn(fn, world: int, *args, timeout: float = 120.0) -> list[int]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; their exit codes.

    A process still running after ``timeout`` seconds is killed and reported as ``None``
    (a deadlock)."""
    ctx = multiprocessing.get_context("spawn")
    store = Path(args[0]) / f"store-{uuid.uuid4().hex}"  # a fresh rendezvous file per group
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, store, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    codes = []
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def _entry(fn, rank, world, store, out, *args):
    faulthandler.enable()  # a rank that crashes prints its Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, Path(out), *args)
    finally:
        gc.collect()  # DDP wrappers sit in reference cycles that hold the group: free them first
        dist.destroy_process_group()


class Recording(bg.Energy):
    """The steep well on one rank; records the raw energies of every call.

    On the ranks in ``poison_ranks``: ``value`` replaces the energy of the first
    ``poison_rows`` samples of every ``poison_every``-th call, or (``poison_above``) of the
    samples whose first coordinate lies above it. ``raise_from``: raise on every call from
    that number on (a dead engine); ``raise_above``: raise for a batch with a sample whose
    first coordinate lies above it (a bad configuration); ``kill_at``: the process dies at
    that call.
    """

    def __init__(self, inner, rank, poison_ranks=(), poison_every=3, poison_rows=1, poison_above=None,
                 value=float("nan"), raise_from=None, raise_above=None, kill_at=None):
        super().__init__(inner.dim)
        self.inner, self.rank = inner, rank
        self.poison = rank in poison_ranks
        self.poison_every, self.poison_rows, self.poison_above = poison_every, poison_rows, poison_above
        self.value = value
        self.raise_from, self.raise_above, self.kill_at = raise_from, raise_above, kill_at
        self.calls = 0
        self.refused = 0  # single samples the target raised for
        self.raw: list[torch.Tensor] = []

    def _energy(self, x):
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os._exit(9)  # killed: no clean-up, no checkpoint
        if self.raise_from is not None and self.calls >= self.raise_from:
            raise RuntimeError(f"engine failure on rank {self.rank}")
        if self.raise_above is not None and bool((x[:, 0] > self.raise_above).any()):
            self.refused += len(x) == 1
            raise RuntimeError("bad configuration")
        u = self.inner._energy(x)
        if self.poison:
            u = u.clone()
            if self.poison_above is not None:
                u[x[:, 0] > self.poison_above] = self.value
            elif self.calls % self.poison_every == 0:
                u[: self.poison_rows] = self.value
        self.raw.append(u.detach().view(-1).clone())
        return u


def make_trainer(rank, ddp=True, target_kwargs=None, seed=0, **kwargs):
    """The steep-well generator (flow wrapped in DDP) and a gated trainer."""
    torch.manual_seed(seed)
    gen = steep_well_generator()
    target = Recording(generator_target(gen), rank, **(target_kwargs or {}))
    flow = torch.nn.parallel.DistributedDataParallel(gen.flow) if ddp else gen.flow
    gen = bg.BoltzmannGenerator(gen.prior, flow, target)
    data = target.inner.sample(1280, generator=torch.Generator().manual_seed(1))
    kwargs.setdefault("schedule", ConstantSchedule(1e12))
    kwargs.setdefault("target_unit", "kJ/mol")
    trainer = ProgressiveKLTrainer(gen, torch.optim.Adam(gen.parameters(), lr=0.05), **kwargs)
    return gen, data, trainer


def _result(gen, trainer, **extra):
    target = trainer.gate.target if trainer.gate is not None else generator_target(gen)
    return {
        "params": {k: v.clone() for k, v in trainer.state_dict()["bg"].items() if k.startswith("_flow.")},
        "history": trainer.history,
        "raw": torch.cat(target.raw) if target.raw else torch.zeros(0),
        "ranks": trainer.ranks.size,
        **extra,
    }


def forced_skips(rank, world, out, skip_policy, value, rows=200):
    """Rank 1 returns ``value`` for ``rows`` of 256 samples of every third call; train 4
    epochs of mixed NLL + KL."""
    gen, data, trainer = make_trainer(
        rank, skip_policy=skip_policy, iters_per_epoch=5,
        target_kwargs=dict(poison_ranks=(1,), poison_every=3, poison_rows=rows, value=value),
    )
    trainer.train(n_epochs=4, data=data, batchsize=256, w_likelihood=0.5, w_energy=0.5)
    torch.save(_result(gen, trainer, data_first=trainer.samplers["data"].data[:3],
                       total=trainer.gate.statistics("total")), out / f"rank{rank}.pt")


def failing_rank(rank, world, out, dead):
    """Rank 1's engine dies at its third call (``dead``: an exception leaves the step), or
    it refuses the samples whose first coordinate is above 1 (the gate gates them)."""
    failure = dict(raise_from=3) if dead else dict(raise_above=1.0)
    gen, data, trainer = make_trainer(
        rank, iters_per_epoch=5, skip_policy="drop", target_kwargs=failure if rank == 1 else {},
    )
    try:
        trainer.train(n_epochs=2, data=data, batchsize=64, w_likelihood=0.5, w_energy=0.5)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    torch.save(_result(gen, trainer, error=error, refused=trainer.gate.target.refused), out / f"rank{rank}.pt")


def checkpointed(rank, world, out, kill_at=None, resume=False):
    """Train 6 epochs with a checkpoint every epoch; ``kill_at``: die at that target call
    (mid-epoch); ``resume``: continue from the checkpoint."""
    gen, data, trainer = make_trainer(
        rank, iters_per_epoch=4, checkpoint_every=1, checkpoint_path=out / "ckpt.pt",
        target_kwargs=dict(kill_at=kill_at, poison_ranks=(1,), poison_above=1.0),
    )
    if resume:
        trainer.resume(out / "ckpt.pt")
    trainer.train(n_epochs=6 - len(trainer.history), data=data, batchsize=128, w_likelihood=0.5, w_energy=0.5)
    torch.save(_result(gen, trainer), out / f"rank{rank}.pt")


def rank0_fails(rank, world, out):
    """``Ranks.on_main`` with a function that raises on rank 0."""
    from bgflow_gate.distributed import Ranks

    def fail():
        raise ValueError("the run directory is occupied")

    try:
        Ranks.default().on_main(fail)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    torch.save({"error": error}, out / f"rank{rank}.pt")
