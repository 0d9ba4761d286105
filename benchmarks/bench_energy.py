"""Throughput of the alanine dipeptide energy model and the internal-coordinate transform.

Prints energies+forces per second for batches of 256 / 1024 / 4096 alanine dipeptide
configurations (the openmmtools structure plus 0.01 nm noise), in vacuum and implicit
solvent, on each OpenMM platform and with 1 and 2 worker processes; and the time of a
forward + inverse pass of the mixed internal-coordinate transform on a batch of 4096.

Usage::

    python benchmarks/bench_energy.py [--sizes 256,1024,4096] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from bgflow_gate.host.openmm import OpenMMBridge
from bgflow_gate.systems.alanine import alanine_dipeptide


def frames(system, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return system.positions_tensor().repeat(n, 1) + 0.01 * torch.randn(n, system.dim, generator=gen, dtype=torch.float64)


def bench_energy(sizes, workers, platforms) -> None:
    print(f"{'solvent':<9} {'platform':<10} {'workers':>7} " + " ".join(f"{f'batch {n}':>12}" for n in sizes) + "   (evaluations / s)")
    for solvent in ("vacuum", "implicit"):
        system = alanine_dipeptide(solvent)
        for platform in platforms:
            for n_workers in workers:
                bridge = OpenMMBridge(system.system, system.integrator(), platform_name=platform, n_workers=n_workers)
                try:
                    rates = []
                    for n in sizes:
                        x = frames(system, n)
                        bridge.evaluate(x[:8])  # warm-up
                        start = time.perf_counter()
                        bridge.evaluate(x)
                        rates.append(n / (time.perf_counter() - start))
                finally:
                    bridge.close()
                print(f"{solvent:<9} {platform:<10} {n_workers:>7} " + " ".join(f"{r:>12,.0f}" for r in rates))


def bench_ic(n: int = 4096) -> None:
    try:
        from bgflow_gate.host.ic import MixedCoordinateTransformation
    except ImportError:
        print("internal coordinates: not available")
        return
    system = alanine_dipeptide("vacuum")
    x = frames(system, n)
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
    parser.add_argument("--sizes", default="256,1024,4096")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--platforms", default="Reference,CPU")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    bench_energy(
        [int(s) for s in args.sizes.split(",")],
        [int(w) for w in args.workers.split(",")],
        args.platforms.split(","),
    )
    bench_ic()


if __name__ == "__main__":
    main()
