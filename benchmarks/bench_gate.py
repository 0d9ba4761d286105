"""What the gate costs: ScheduledEnergyGate against its wrapped target and a bare torch.where.

For each batch size the script times, per call (median of repeated calls):

* ``target``   the wrapped target's ``energy`` alone;
* ``gate``     ``ScheduledEnergyGate(target).energy`` (statistics included);
* ``where``    ``torch.where(e > E_max, E_max, e)`` over the target's output alone: the
  least any gate must do;

forward only and forward + backward (best of ``--repeats`` calls), and prints the gate's
overhead (gate - target) per sample and as a multiple of ``where``. Targets: ``trivial`` (a sum over 3 coordinates,
cheaper than any gate), ``pairwise`` (a 22-particle soft-sphere energy, a
small-molecule-sized torch target) and ``alanine`` (:class:`~bgflow_gate.TorchEnergy` of alanine
dipeptide in vacuum, from ``--cache``'s ``alanine_vacuum.pt`` or built with OpenMM; thermal-noise
frames around a structure; skipped when neither is at hand). The gate around a TorchEnergy reads
nothing back to the host (it accepts non-finite coordinates).

Usage::

    python benchmarks/bench_gate.py                    # CPU, and CUDA when available
    python benchmarks/bench_gate.py --device cpu --sizes 256,4096 --repeats 20
    python benchmarks/bench_gate.py --targets alanine --sizes 4096 --cache gpu_cache
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bgflow_gate import ScheduledEnergyGate, ThreeStageSchedule, bg


class Trivial(bg.Energy):
    def __init__(self):
        super().__init__(3)

    def _energy(self, x):
        return x.sum(-1, keepdim=True)


class PairwiseSoftSpheres(bg.Energy):
    """Repulsive 1/r^12 pairs between 22 particles (66 coordinates)."""

    def __init__(self, n_particles: int = 22):
        super().__init__(3 * n_particles)
        self.n = n_particles
        self.register_buffer("iu", torch.triu_indices(n_particles, n_particles, 1))

    def _energy(self, x):
        pos = x.view(*x.shape[:-1], self.n, 3)
        d2 = (pos[..., self.iu[0], :] - pos[..., self.iu[1], :]).pow(2).sum(-1)
        return (0.3**2 / d2).pow(6).sum(-1, keepdim=True)


def alanine(cache: str | None):
    """TorchEnergy of alanine dipeptide in vacuum and a structure to perturb, or ``None``."""
    from bgflow_gate import TorchEnergy

    path = Path(cache or "gpu_cache") / "alanine_vacuum.pt"
    if path.is_file():
        data = torch.load(path, weights_only=False)
        return TorchEnergy.from_dict(data["energy"]), torch.as_tensor(data["reference"]["frames"][0])
    try:
        from bgflow_gate.systems.alanine import alanine_dipeptide
    except ImportError:
        return None
    system = alanine_dipeptide("vacuum")
    return TorchEnergy.from_openmm(system.system, temperature=300.0), system.positions_tensor().reshape(-1)


def frames(target, batch: int, structure: torch.Tensor | None) -> torch.Tensor:
    """Random inputs (around ``structure`` with 0.005 nm noise when given), a few far off."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if structure is None:
        x = torch.randn(batch, target.dim, generator=gen)
    else:
        x = structure.double().expand(batch, -1) + 0.005 * torch.randn(batch, target.dim, generator=gen, dtype=torch.float64)
    x[1] *= 1e3  # a few samples above E_max
    x[2] *= 1e6
    return x


def _time(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call: the best of ``repeats`` calls (robust to a busy machine)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(target: bg.Energy, batch: int, device: torch.device, repeats: int, backward: bool,
          structure: torch.Tensor | None = None) -> dict:
    x = frames(target, batch, structure).to(device)
    target = target.to(device)
    unit = {} if getattr(target, "unit", None) else {"target_unit": "kJ/mol"}  # a TorchEnergy says kT itself
    gate = ScheduledEnergyGate(target, schedule=ThreeStageSchedule(), e_cut=500.0, **unit)
    gate.set_epoch(250.0)
    e_max = gate.e_max

    def run(energy_fn):
        def call():
            xs = x.detach().requires_grad_(backward)
            e = energy_fn(xs)
            if backward:
                e.sum().backward()

        return call

    energies = target.energy(x).detach()

    def where():
        e = energies.detach().requires_grad_(backward)
        out = torch.where(e > e_max, e_max, e)
        if backward:
            out.sum().backward()

    t_target = _time(run(target.energy), device, repeats)
    t_gate = _time(run(gate.energy), device, repeats)
    t_where = _time(where, device, repeats)
    gate.statistics()  # fold and read out everything those calls accumulated
    return {"target": t_target, "gate": t_gate, "where": t_where}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--sizes", default="256,1024,4096,16384,65536")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--targets", default="trivial,pairwise,alanine")
    parser.add_argument("--cache", default=None, help="folder with alanine_vacuum.pt (default gpu_cache)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    for dev in devices:
        device = torch.device(dev)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for target_name, target, structure in _targets(args):
            for backward in (False, True):
                mode = "forward+backward" if backward else "forward"
                print(f"\n[{name}] target={target_name} {mode}")
                print(
                    f"{'batch':>7} {'target us':>10} {'gate us':>10} {'where us':>9} "
                    f"{'overhead ns/sample':>19} {'overhead/where':>15} {'gate/target':>12}"
                )
                for batch in sizes:
                    r = bench(target, batch, device, args.repeats, backward, structure)
                    overhead = r["gate"] - r["target"]
                    print(
                        f"{batch:>7} {1e6 * r['target']:>10.1f} {1e6 * r['gate']:>10.1f} "
                        f"{1e6 * r['where']:>9.1f} {1e9 * overhead / batch:>19.1f} "
                        f"{overhead / r['where']:>15.1f} {r['gate'] / r['target']:>12.2f}"
                    )


def _targets(args) -> list:
    wanted = args.targets.split(",")
    out = [(n, t, None) for n, t in (("trivial", Trivial()), ("pairwise", PairwiseSoftSpheres())) if n in wanted]
    if "alanine" in wanted:
        found = alanine(args.cache)
        if found is None:
            print("alanine: skipped (no gpu_cache/alanine_vacuum.pt and no OpenMM)")
        else:
            out.append(("alanine (TorchEnergy, float64)", found[0].double(), found[1]))
    return out


if __name__ == "__main__":
    main()
