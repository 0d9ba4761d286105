"""Where the time of one ``aa_vacuum_is`` training iteration goes, component by component.

The experiment's mixed stage as ``bgflow-gate train`` builds it (``bgflow_gate/experiments.yaml``):
the physical generator of :mod:`bgflow_gate.systems.physical` (all rotors, 4 + 4 couplings
x 128, 8 bins, float32, around the energy minimum) on alanine dipeptide in vacuum, the
target a :class:`~bgflow_gate.TorchEnergy` at 300 K (``make_target``, backend torch), the
gated :class:`~bgflow_gate.ProgressiveKLTrainer` (the experiment's gate, skip policy,
``max_grad_norm``; Adam at the mixed learning rate), batch ``--batch``,
``w_energy=0.9`` (reverse KL) + ``w_likelihood=0.1`` (NLL on the cached MD frames).

Each component is timed alone, forward and backward: its inputs are fresh leaf tensors that
require grad and its backward pushes a random cotangent through its outputs (the energy: the
sum). The flow is
``gen.flow._blocks = [ICSplineFlow, TorsionLayout, InverseFlow(IC transform)]``.

* KL half: (1) ``ICSplineFlow`` forward from the latent ``z``, (2) ``TorsionLayout`` + the
  inverse IC transform (internal -> Cartesian), (3) the TorchEnergy (it computes its
  gradient in the forward pass, so its backward is one product).
* NLL half: the IC transform forward (Cartesian -> internal, with ``TorsionLayout``'s
  inverse) and the ``ICSplineFlow`` inverse. In training the MD frames carry no gradient,
  so the IC transform's backward (marked ``*``) is not part of an iteration.
* The optimiser step: gradient clipping (norm 10) and Adam.
* The whole iteration: one ``trainer.train(--iters)`` call per round, each iteration timed
  alone; its "rest" is what the components leave (gate, losses, gradient bookkeeping,
  batch drawing, the history).

Every measurement runs once per round, ``--repeats`` rounds after a warm-up round,
interleaved so that a burst of load hits them all alike; the table shows the best round of
each (and the median iteration). Shares are (forward + backward) / best whole iteration.
Run with one thread and nothing else heavy: the load average is printed with the table.

With ``--operations`` it counts, instead of timing, the tensor operations each component and
a whole iteration dispatch (forward and backward). The count does not depend on the batch
size, and on a GPU each operation costs at least one kernel launch of a few
microseconds of host time: a model that dispatches thousands per iteration is bound by
launches there, not by arithmetic.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/profile_iteration.py [--batch 512] [--repeats 15]
        [--iters 5] [--rest-spline-bins 8] [--data-dir DIR] [--operations] [--device cuda]

Without OpenMM (a GPU machine) it builds everything from ``--data-dir``'s cached data and system
snapshot (``benchmarks/make_gpu_cache.py --full aa_vacuum_is`` writes them), as
``bgflow-gate train`` does.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from bgflow_gate import ProgressiveKLTrainer, TrainingHealthWarning
from bgflow_gate.config import DEFAULT_CONFIG, load_experiments, run_settings
from bgflow_gate.distributed import Ranks
from bgflow_gate.pipeline import RunContext

EXPERIMENT = "aa_vacuum_is"
FOOTNOTE = "* backward not part of an iteration (the MD frames carry no gradient); left out of the shares"


def build(args: argparse.Namespace) -> dict:
    """The experiment's settings, generator, target and MD training frames, built by the
    pipeline's :class:`~bgflow_gate.pipeline.RunContext` (without OpenMM from the data
    directory's system snapshot, as ``bgflow-gate train`` does), on ``args.device``.

    Parameters
    ----------
    args : argparse.Namespace
        The command line (``rest_spline_bins``, ``data_dir``, ``device``).

    Returns
    -------
    dict
        ``settings``, ``gen`` (the BoltzmannGenerator), ``target`` and ``train``
        (``[n, 66]`` frames of the training split, on the device).
    """
    settings = run_settings(load_experiments(DEFAULT_CONFIG), EXPERIMENT, device=args.device)
    settings["model"]["rest_spline_bins"] = args.rest_spline_bins
    ctx = RunContext(settings, args.data_dir, lambda line: None, False, Ranks.default())
    torch.manual_seed(settings["training"]["seed"])
    gen, _ = ctx.generator()
    return dict(settings=settings, gen=gen, target=ctx.target, train=ctx.train)


def _synchronize(x: torch.Tensor) -> None:
    """Wait for the device's queued work (a CUDA timer would otherwise time the launches only)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _leaves(inputs) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_(True) for x in inputs]


class Seconds:
    """Wall seconds of the ``with`` block in ``value``, the device's queued work included
    (``x``: a tensor on the device)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.value = x, 0.0

    def __enter__(self) -> "Seconds":
        _synchronize(self.x)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _synchronize(self.x)
        self.value = time.perf_counter() - self.start


class OperationCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensor operations dispatched inside the ``with`` block, in ``value`` (views
    and in-place ones included); built like :class:`Seconds` (``x`` is not needed)."""

    def __init__(self, x: torch.Tensor | None = None):
        super().__init__()
        self.value = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.value += 1
        return func(*args, **(kwargs or {}))


def call_once(part: dict, params, meter=Seconds) -> tuple[float, float]:
    """Seconds (or what ``meter`` measures) of one forward and one backward of a component,
    on fresh leaf inputs.

    Parameters
    ----------
    part : dict
        ``fn`` (returns a tensor or a tuple of tensors), ``inputs`` (copied into fresh leaves
        that require grad), ``sum_only`` (backpropagate the sum instead of a random cotangent);
        the cotangents are drawn on the first call and stored in it as ``cotangents``.
    params : sequence of torch.nn.Parameter
        Whose gradients are cleared before the backward (outside the measurement).
    meter : type
        :class:`Seconds` or :class:`OperationCount`.

    Returns
    -------
    tuple
        ``(forward, backward)``: seconds, or operations.
    """
    leaves = _leaves(part["inputs"])
    with meter(leaves[0]) as forward:
        out = part["fn"](*leaves)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
    if "cotangents" not in part:
        part["cotangents"] = [torch.ones_like(o) if part["sum_only"] else torch.randn_like(o) for o in outs]
    for p in params:
        p.grad = None
    with meter(leaves[0]) as backward:
        torch.autograd.backward(outs, grad_tensors=part["cotangents"])
    return forward.value, backward.value


def components(gen, target, train: torch.Tensor, batch: int) -> list[dict]:
    """The KL and NLL pieces: ``name``, ``fn``, ``inputs``, ``sum_only``, ``in_iteration``
    (whether its backward is part of a training iteration)."""
    spline, layout, inverse_ic = gen.flow._blocks
    with torch.no_grad():
        z = gen.prior.sample(batch)
        *ics, _ = spline(z)
        x, _ = inverse_ic(*layout(*ics)[:-1])
        frames = train[torch.randint(len(train), (batch,))]
        *data_ics, _ = layout(*inverse_ic(frames, inverse=True)[:-1], inverse=True)

    def to_cartesian(*ic):
        *layout_out, dlogp = layout(*ic)
        out, dlogp_ic = inverse_ic(*layout_out)
        return out, dlogp + dlogp_ic

    def to_internal(xs):
        *ic, dlogp = inverse_ic(xs, inverse=True)
        *out, dlogp_layout = layout(*ic, inverse=True)
        return (*out, dlogp + dlogp_layout)

    table = [
        ("KL  (1) ICSplineFlow forward, z -> IC", spline, [z], False, True),
        ("KL  (2) TorsionLayout + IC inverse -> x", to_cartesian, ics, False, True),
        ("KL  (3) TorchEnergy", target.energy, [x], True, True),
        ("NLL (4) IC forward + layout inv., x -> IC", to_internal, [frames], False, False),
        ("NLL (5) ICSplineFlow inverse, IC -> z", lambda *ic: spline(*ic, inverse=True), data_ics, False, True),
    ]
    keys = ("name", "fn", "inputs", "sum_only", "in_iteration")
    return [dict(zip(keys, row)) for row in table]


def make_trainer(gen, settings: dict) -> ProgressiveKLTrainer:
    """The mixed stage's trainer as the pipeline builds it (no checkpoints, no LR schedule)."""
    t, g = settings["training"], settings["gate"]
    gate = dict(schedule=g["schedule"], e_cut=g["e_cut"], adaptive_quantile=g["adaptive_quantile"],
                above_cut=g["above_cut"]) if settings["use_energy_gating"] else {"gate": False}
    optim = torch.optim.Adam(gen.parameters(), lr=t["mixed_lr"])
    return ProgressiveKLTrainer(
        gen, optim, iters_per_epoch=t["iters_per_epoch"], max_grad_norm=t["max_grad_norm"],
        skip_policy=t["skip_policy"], min_keep_fraction=t["min_keep_fraction"], on_stall=t["on_stall"], **gate,
    )


def iteration_seconds(trainer, settings: dict, train: torch.Tensor, batch: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` ``trainer.train`` iterations (timed between the progress
    bar's steps, so the once-per-call set-up is left out)."""
    t = settings["training"]
    stamps = []

    def stamped(iterations):
        for i in iterations:
            _synchronize(train)
            stamps.append(time.perf_counter())
            yield i
        _synchronize(train)
        stamps.append(time.perf_counter())

    trainer.train(iters, data=train, batchsize=batch, w_likelihood=t["w_likelihood"], w_energy=t["w_energy"],
                  clip_forces=t["clip_forces"], progress_bar=stamped)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def optimizer_step_seconds(trainer) -> float:
    """Seconds of gradient clipping + ``optim.step()`` on the gradients the trainer left."""
    params = [p for group in trainer.optim.param_groups for p in group["params"] if p.grad is not None]
    with Seconds(params[0]) as seconds:
        torch.nn.utils.clip_grad_norm_(params, trainer.max_grad_norm)
        trainer.optim.step()
    return seconds.value


def profile(parts: dict, args: argparse.Namespace) -> tuple[list[tuple], float, float, float]:
    """Rounds of every measurement, interleaved so a burst of load on the machine hits all
    of them alike; the first round is the warm-up.

    Returns
    -------
    tuple
        ``(rows, optimiser step ms, whole iteration ms, median iteration ms)``, each the best
        over the rounds (the iteration: best and median of all timed iterations); ``rows``
        are ``(name, forward ms, backward ms, in_iteration)``.
    """
    gen = parts["gen"]
    pieces = components(gen, parts["target"], parts["train"], args.batch)
    trainer = make_trainer(gen, parts["settings"])
    params = list(gen.parameters())
    best = {p["name"]: (float("inf"), float("inf")) for p in pieces}
    step, iterations = float("inf"), []
    for round_ in range(args.repeats + 1):
        times = {p["name"]: call_once(p, params) for p in pieces}
        seconds = iteration_seconds(trainer, parts["settings"], parts["train"], args.batch, args.iters)
        step_seconds = optimizer_step_seconds(trainer)
        if round_ == 0:
            continue
        best = {k: (min(best[k][0], times[k][0]), min(best[k][1], times[k][1])) for k in best}
        step, iterations = min(step, step_seconds), iterations + seconds
    rows = [(p["name"], 1e3 * best[p["name"]][0], 1e3 * best[p["name"]][1], p["in_iteration"]) for p in pieces]
    return rows, 1e3 * step, 1e3 * min(iterations), 1e3 * float(np.median(iterations))


def count_operations(parts: dict, args: argparse.Namespace) -> tuple[list[tuple], int, int]:
    """Operations of each component (forward, backward) and of one whole trainer iteration
    (the mean of ``args.iters``, after a warm-up call); the optimiser step's included."""
    gen = parts["gen"]
    pieces = components(gen, parts["target"], parts["train"], args.batch)
    trainer = make_trainer(gen, parts["settings"])
    params = list(gen.parameters())
    rows = []
    for part in pieces:
        call_once(part, params)  # warm-up: lazy set-up is not counted
        rows.append((part["name"], *call_once(part, params, OperationCount), part["in_iteration"]))
    iteration_seconds(trainer, parts["settings"], parts["train"], args.batch, 1)
    with OperationCount() as whole:
        iteration_seconds(trainer, parts["settings"], parts["train"], args.batch, args.iters)
    with OperationCount() as step:
        optimizer_step_seconds(trainer)
    return rows, step.value, whole.value // args.iters


def print_shares(rows: list[tuple], step, total, header: str, unit: str = "ms", best: str = " (best)") -> None:
    """The table: component, forward, backward (``unit``: ms or ops), share of the whole
    iteration; the optimiser step and the rest (what the components leave) below them."""
    number = (lambda v, w: f"{v:{w}d}") if unit == "ops" else (lambda v, w: f"{v:{w}.1f}")
    print(header)
    print(f"{'component':<44} {'fwd ' + unit:>8} {'bwd ' + unit:>8} {'share':>7}")
    counted = 0
    for name, fwd, bwd, in_iteration in rows:
        part = fwd + (bwd if in_iteration else 0)
        counted += part
        mark = "" if in_iteration else "*"
        print(f"{name:<44} {number(fwd, 8)} {number(bwd, 7)}{mark:1} {100 * part / total:6.1f}%")
    print(f"{'optimiser: clip_grad_norm + Adam step':<44} {number(step, 8)} {'':>8} {100 * step / total:6.1f}%")
    rest = total - counted - step
    print(f"{'rest (gate, losses, grad bookkeeping, ...)':<44} {number(rest, 8)} {'':>8} {100 * rest / total:6.1f}%")
    print(f"{'whole ProgressiveKLTrainer iteration' + best:<44} {number(total, 8)} {'':>8} {100.0:6.1f}%")


def main(argv=None) -> dict:
    """Build, time and print; returns the rows, the optimiser step and the whole iteration (ms)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (after one warm-up round)")
    parser.add_argument("--iters", type=int, default=5, help="trainer iterations per round")
    parser.add_argument("--rest-spline-bins", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--operations", action="store_true", help="count tensor operations instead of timing")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", TrainingHealthWarning)
    if args.operations:
        rows, step, total = count_operations(build(args), args)
        print_shares(rows, step, total, f"{EXPERIMENT}: tensor operations per call, rest_spline_bins "
                     f"{args.rest_spline_bins}, on {args.device} (the same at any batch size; on CUDA Adam's "
                     f"multi-tensor step dispatches fewer)", unit="ops", best="")
        print(FOOTNOTE)
        return dict(rows=rows, step=step, total=total)
    load_before = os.getloadavg()
    rows, step_ms, total_ms, median_ms = profile(build(args), args)
    load_after = os.getloadavg()
    header = (f"{EXPERIMENT} on {args.device}: batch {args.batch}, rest_spline_bins {args.rest_spline_bins}, best of "
              f"{args.repeats} rounds ({args.iters} iterations each); torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s); load average {load_before[0]:.2f} before, "
              f"{load_after[0]:.2f} after")
    print_shares(rows, step_ms, total_ms, header)
    print(f"{'whole ProgressiveKLTrainer iteration (median)':<44} {median_ms:8.1f}")
    print(FOOTNOTE)
    return dict(rows=rows, step_ms=step_ms, total_ms=total_ms, median_ms=median_ms)


if __name__ == "__main__":
    main()
