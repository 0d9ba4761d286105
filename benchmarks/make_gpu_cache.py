"""Write what ``benchmarks/gpu_check.sh`` needs on a machine without OpenMM or a package registry.

Run it here (OpenMM installed); it fills a git-ignored folder (default ``gpu_cache/``) that the
GPU run carries:

* ``alanine_vacuum.pt``, ``alanine_implicit.pt``: each a dict with ``energy`` (a
  :meth:`TorchEnergy.to_dict`, 300 K), ``positions`` (openmmtools' structure, ``[22, 3]`` nm)
  and ``reference`` (``frames [8, 66]``, OpenMM Reference ``energies`` [8] in kJ/mol and
  ``forces [8, 66]`` in kJ/mol/nm), loadable with ``torch.load(..., weights_only=True)``;
* ``wheels/``: pure-Python wheels of the package's imports that the GPU image lacks (zuko);
* with ``--experiment``: ``experiments.yaml`` (the packaged experiments, ``aa_300_450_gpu``
  shortened: :data:`SHORT_GPU_RUN`) and its replica-exchange data with the system snapshot in
  ``data/`` (``bgflow-gate data``, minutes here), so the GPU run can train it without OpenMM;
* with ``--full NAME``: the data and system snapshot of the packaged experiment ``NAME`` in
  ``data/``, unshortened (copied from the default data cache when it is there, otherwise
  generated: ``aa_vacuum_is`` takes ~15 minutes here), for ``gpu_check.sh --full NAME``.

Usage::

    python benchmarks/make_gpu_cache.py [--out gpu_cache] [--experiment] [--full aa_vacuum_is]
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

#: What the shortened ``aa_300_450_gpu`` changes (nested keys of the experiment).
SHORT_GPU_RUN = {
    "data": {"n_iterations": 120, "equilibration_iterations": 10},
    "training": {"nll_epochs": 12, "mixed_epochs": 6, "iters_per_epoch": 10, "warmup_epochs": 2},
    "evaluation": {"n_samples": 20000},
}
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


def write_data(name: str, data: Path, *options: str) -> None:
    """``bgflow-gate data --experiment name --data-dir data [options]`` (the system snapshot
    too; loads the data when they are cached there, else runs the replica exchange)."""
    command = [sys.executable, "-m", "bgflow_gate.cli", "data", "--experiment", name, *options, "--data-dir", str(data)]
    subprocess.run(command, check=True)


def write_short_experiment(out: Path) -> None:
    """``experiments.yaml`` with ``aa_300_450_gpu`` shortened, and its data in ``out / "data"``."""
    import yaml
    from importlib import resources

    experiments = yaml.safe_load(resources.files("bgflow_gate").joinpath("experiments.yaml").read_text())
    run = experiments["aa_300_450_gpu"]
    for section, changes in SHORT_GPU_RUN.items():
        run[section] = {**run.get(section, {}), **changes}
    (out / "experiments.yaml").write_text(yaml.safe_dump(experiments, sort_keys=False))
    write_data("aa_300_450_gpu", out / "data", "--config", str(out / "experiments.yaml"))
    print(f"wrote {out / 'experiments.yaml'} and the data of the shortened aa_300_450_gpu into {out / 'data'}")


def write_full_experiment(name: str, out: Path) -> None:
    """The data of the packaged experiment ``name`` and its system snapshot in ``out / "data"``."""
    import shutil

    from bgflow_gate.config import DEFAULT_CONFIG, load_experiments, run_settings
    from bgflow_gate.systems.data import default_data_dir

    settings = run_settings(load_experiments(DEFAULT_CONFIG), name, cuda_available=True)["data"]
    data = out / "data"
    data.mkdir(exist_ok=True)
    file = f"alanine_{settings.solvent}_{settings.key}.npz"
    if (default_data_dir() / file).is_file() and not (data / file).is_file():
        shutil.copy2(default_data_dir() / file, data / file)
    write_data(name, data)
    print(f"wrote the data of {name} into {data}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "gpu_cache")
    parser.add_argument("--no-wheels", action="store_true", help="skip downloading the wheels")
    parser.add_argument("--experiment", action="store_true", help="also the shortened aa_300_450_gpu and its data")
    parser.add_argument("--full", metavar="NAME", help="also the data of the packaged experiment NAME, unshortened")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for solvent in SOLVENTS:
        cache_system(solvent, args.out)
    if not args.no_wheels:
        download_wheels(args.out)
    if args.experiment:
        write_short_experiment(args.out)
    if args.full:
        write_full_experiment(args.full, args.out)


if __name__ == "__main__":
    main()
