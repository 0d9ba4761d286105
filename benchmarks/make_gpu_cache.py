"""Write what ``benchmarks/gpu_check.sh`` needs on a machine without OpenMM or a package registry.

Run it here (OpenMM installed); it fills a git-ignored folder (default ``gpu_cache/``) that the
GPU run carries:

* ``alanine_vacuum.pt``, ``alanine_implicit.pt``: each a dict with ``energy`` (a
  :meth:`TorchEnergy.to_dict`, 300 K), ``positions`` (openmmtools' structure, ``[22, 3]`` nm)
  and ``reference`` (``frames [8, 66]``, OpenMM Reference ``energies`` [8] in kJ/mol and
  ``forces [8, 66]`` in kJ/mol/nm), loadable with ``torch.load(..., weights_only=True)``;
* ``wheels/``: pure-Python wheels of the package's imports that the GPU image lacks (zuko).

Usage::

    python benchmarks/make_gpu_cache.py [--out gpu_cache]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from bgflow_gate.energies import TorchEnergy
from bgflow_gate.energies.openmm_reader import reference_energies
from bgflow_gate.systems.alanine import SOLVENTS, alanine_dipeptide

#: Imports of the package that the GPU image does not have (its list: /work/.library/device/KINDS.md).
WHEELS = ("zuko",)


def cache_system(solvent: str, out: Path) -> None:
    system = alanine_dipeptide(solvent)
    energy = TorchEnergy.from_openmm(system.system, temperature=300.0)
    rng = np.random.default_rng(0)
    frames = system.positions[None] + rng.normal(scale=0.01, size=(8, *system.positions.shape))
    energies, forces = reference_energies(system.system, frames)
    data = {
        "energy": energy.to_dict(),
        "positions": torch.tensor(system.positions),
        "reference": {
            "frames": torch.tensor(frames.reshape(8, -1)),
            "energies": torch.tensor(energies),
            "forces": torch.tensor(forces.reshape(8, -1)),
        },
    }
    torch.save(data, out / f"alanine_{solvent}.pt")
    print(f"wrote {out / f'alanine_{solvent}.pt'} (terms {', '.join(energy.terms)})")


def download_wheels(out: Path) -> None:
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    for name in WHEELS:
        pinned = f"{name}=={metadata.version(name)}"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels), pinned],
            check=True,
        )
        print(f"wrote the wheel of {pinned} into {wheels}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "gpu_cache")
    parser.add_argument("--no-wheels", action="store_true", help="skip downloading the wheels")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for solvent in SOLVENTS:
        cache_system(solvent, args.out)
    if not args.no_wheels:
        download_wheels(args.out)


if __name__ == "__main__":
    main()
