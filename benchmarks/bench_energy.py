"""Throughput of the alanine dipeptide energy: OpenMM bridges and the batched TorchEnergy.

Prints energies+forces per second for batches of alanine dipeptide configurations (the
openmmtools structure plus 0.01 nm noise), in vacuum and implicit solvent:

* ``openmm``: :class:`~bgflow_gate.host.openmm.OpenMMBridge` on each OpenMM platform with
  1 and 2 worker processes;
* ``torch``: :class:`~bgflow_gate.TorchEnergy` (energy, then ``backward`` for the forces) in
  float32 and float64 on ``--device``;
* ``ratio``: at one batch size, every engine measured side by side, several rounds in turn,
  best round each, and the torch energy's speed as a multiple of the single Reference worker
  (vacuum) and of the single CPU-platform worker (implicit);
* the forward + inverse pass of the mixed internal-coordinate transform.

Without OpenMM (a GPU machine) the torch energies and frames come from ``--cache``, written
by ``benchmarks/make_gpu_cache.py``, and the OpenMM parts are skipped.

Usage::

    python benchmarks/bench_energy.py [--sizes 256,1024,4096,16384] [--workers 1,2]
    python benchmarks/bench_energy.py --only torch,ratio --device cuda --cache gpu_cache
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

from bgflow_gate.energies import TorchEnergy
from bgflow_gate.host.openmm import OpenMMBridge

PARTS = ("openmm", "torch", "ratio", "ic")


def have_openmm() -> bool:
    try:
        import openmm  # noqa: F401
        import openmmtools  # noqa: F401
    except ImportError:
        return False
    return True


def load_system(solvent: str, cache: Path | None) -> tuple[TorchEnergy, torch.Tensor, object]:
    """(torch energy, positions ``[1, 66]``, the OpenMM system or None) at 300 K."""
    if cache is not None and (cache / f"alanine_{solvent}.pt").exists():
        data = torch.load(cache / f"alanine_{solvent}.pt", weights_only=True)
        return TorchEnergy.from_dict(data["energy"]), data["positions"].reshape(1, -1), None
    from bgflow_gate.systems.alanine import alanine_dipeptide

    system = alanine_dipeptide(solvent)
    return TorchEnergy.from_openmm(system.system, 300.0), system.positions_tensor(), system


def frames(positions: torch.Tensor, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return positions.repeat(n, 1) + 0.01 * torch.randn(n, positions.shape[-1], generator=gen, dtype=torch.float64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_rate(energy: TorchEnergy, x: torch.Tensor, repeats: int) -> float:
    """Energies+forces per second: the best of ``repeats`` calls after a warm-up."""
    x = x.detach().requires_grad_(True)
    best = float("inf")
    for k in range(repeats + 2):
        sync(x.device)
        start = time.perf_counter()
        energy.energy(x).sum().backward()
        sync(x.device)
        if k >= 2:
            best = min(best, time.perf_counter() - start)
        x.grad = None
    return x.shape[0] / best


def bridge_rate(bridge: OpenMMBridge, x: torch.Tensor) -> float:
    bridge.evaluate(x[:8])  # warm-up
    start = time.perf_counter()
    bridge.evaluate(x)
    return x.shape[0] / (time.perf_counter() - start)


def bench_openmm(sizes, workers, platforms) -> None:
    print(f"{'solvent':<9} {'engine':<16} {'workers':>7} " + " ".join(f"{f'batch {n}':>12}" for n in sizes) + "   (energies+forces / s)")
    for solvent in ("vacuum", "implicit"):
        _, positions, system = load_system(solvent, None)
        for platform in platforms:
            for n_workers in workers:
                bridge = OpenMMBridge(system.system, system.integrator(), platform_name=platform, n_workers=n_workers)
                try:
                    rates = [bridge_rate(bridge, frames(positions, n)) for n in sizes]
                finally:
                    bridge.close()
                print(f"{solvent:<9} {'OpenMM ' + platform:<16} {n_workers:>7} " + " ".join(f"{r:>12,.0f}" for r in rates))


def bench_torch(sizes, dtypes, device: torch.device, cache: Path | None, repeats: int) -> None:
    print(f"{'solvent':<9} {'engine':<16} {'device':>7} " + " ".join(f"{f'batch {n}':>12}" for n in sizes) + "   (energies+forces / s)")
    for solvent in ("vacuum", "implicit"):
        energy, positions, _ = load_system(solvent, cache)
        for dtype in dtypes:
            rates = [torch_rate(energy, frames(positions, n).to(device, dtype), repeats) for n in sizes]
            name = f"torch {str(dtype).split('.')[-1]}"
            print(f"{solvent:<9} {name:<16} {device.type:>7} " + " ".join(f"{r:>12,.0f}" for r in rates))


def _engines(solvent: str, energy: TorchEnergy, system, device: torch.device, bridges: list) -> dict:
    """name -> function(x) that returns energies+forces per second for batch ``x`` (float64, CPU)."""
    engines = {}
    for platform, n_workers in (("Reference", 1), ("Reference", 2), ("CPU", 1), ("CPU", 2)):
        bridge = OpenMMBridge(system.system, system.integrator(), platform_name=platform, n_workers=n_workers)
        bridges.append(bridge)
        engines[f"OpenMM {platform} x{n_workers}"] = lambda x, b=bridge: bridge_rate(b, x)
    for dtype in (torch.float32, torch.float64):
        name = f"torch {str(dtype).split('.')[-1]} {device.type}"
        engines[name] = lambda x, d=dtype: torch_rate(energy, x.to(device, d), 3)
    return engines


def bench_ratio(n: int, device: torch.device, rounds: int) -> None:
    """Every engine side by side at batch ``n``, ``rounds`` rounds in turn, best round each."""
    baseline = {"vacuum": "OpenMM Reference x1", "implicit": "OpenMM CPU x1"}
    for solvent in ("vacuum", "implicit"):
        energy, positions, system = load_system(solvent, None)
        bridges: list = []
        try:
            engines = _engines(solvent, energy, system, device, bridges)
            x = frames(positions, n)
            best = {name: 0.0 for name in engines}
            for _ in range(rounds):
                for name, rate in engines.items():
                    best[name] = max(best[name], rate(x))
        finally:
            for bridge in bridges:
                bridge.close()
        base = best[baseline[solvent]]
        print(f"{solvent}, batch {n}, best of {rounds} rounds (load average {os.getloadavg()[0]:.1f}):")
        for name, rate in best.items():
            print(f"  {name:<24} {rate:>12,.0f} /s   {rate / base:>6.2f} x {baseline[solvent]}")


def bench_ic(n: int = 4096) -> None:
    try:
        from bgflow_gate.host.ic import MixedCoordinateTransformation
        from bgflow_gate.systems.alanine import alanine_dipeptide
    except ImportError:
        print("internal coordinates: not available")
        return
    system = alanine_dipeptide("vacuum")
    x = frames(system.positions_tensor(), n)
    transform = MixedCoordinateTransformation(x, system.z_matrix, system.rigid_block)
    for dtype in (torch.float32, torch.float64):
        t = transform.to(dtype)
        xd = x.to(dtype)
        *ics, _ = t(xd)
        start = time.perf_counter()
        for _ in range(5):
            *ics, _ = t(xd)
            t(*ics, inverse=True)
        seconds = (time.perf_counter() - start) / 5
        print(f"internal coordinates, mixed transform, batch {n}, {str(dtype).split('.')[-1]}: "
              f"forward + inverse {1e3 * seconds:.1f} ms ({1e9 * seconds / n:.0f} ns per configuration)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,4096,16384", help="batch sizes for the openmm and torch parts")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--platforms", default="Reference,CPU")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the torch energy")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ratio-batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side ratio part")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per torch measurement (best taken)")
    parser.add_argument("--cache", type=Path, default=None, help="folder of make_gpu_cache.py's files (no OpenMM needed)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.only.split(",")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, device {device}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    sizes = [int(s) for s in args.sizes.split(",")]
    openmm_here = have_openmm()
    if "openmm" in parts and openmm_here:
        bench_openmm(sizes, [int(w) for w in args.workers.split(",")], args.platforms.split(","))
    if "torch" in parts:
        bench_torch(sizes, [getattr(torch, d) for d in args.dtypes.split(",")], device, args.cache, args.repeats)
    if "ratio" in parts and openmm_here:
        bench_ratio(args.ratio_batch, device, args.rounds)
    if "ic" in parts:
        bench_ic()
    if not openmm_here:
        print("OpenMM is not installed here: the OpenMM and side-by-side parts were skipped")


if __name__ == "__main__":
    main()
