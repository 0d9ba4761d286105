"""Write the shortened ``aa_300_450_gpu`` that ``benchmarks/gpu_check.sh`` trains on a GPU
machine without OpenMM: ``gpu_cache/experiments.yaml`` (the packaged experiment with short
data and short stages, same model, batch and backend) and ``gpu_cache/data/`` (its replica-
exchange dataset and the system snapshot, written by ``bgflow-gate data``).

Run it here, where OpenMM is installed (implicit solvent: a few minutes on 2 cores)::

    python benchmarks/make_gpu_run_cache.py [--out gpu_cache]

On the GPU machine ``bgflow-gate train --config gpu_cache/experiments.yaml --experiment
aa_300_450_gpu --data-dir gpu_cache/data`` then reads the dataset and the TorchEnergy from the
cache and never imports OpenMM (:mod:`bgflow_gate.systems.snapshot`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bgflow_gate.cli import main as cli
from bgflow_gate.config import DEFAULT_CONFIG, load_experiments

NAME = "aa_300_450_gpu"

#: What the shortened run changes: 4 replicas x 42 ps of data, 20 + 10 + 10 epochs of 20
#: iterations, the gate's schedule compressed to them, 20,000 samples per model.
SHORT = {
    "data": {"n_replicas": 4, "n_iterations": 400, "steps_per_iteration": 100, "equilibration_iterations": 20},
    "gate": {"schedule": {"hold_epochs": 2, "warmup_epochs": 8}},
    "training": {"nll_epochs": 20, "mixed_epochs": 10, "warmup_epochs": 2},
    "evaluation": {"n_samples": 20000},
}


def shortened(experiment: dict, changes: dict) -> dict:
    """``experiment`` with ``changes`` merged in, section by section (nested mappings too)."""
    out = dict(experiment)
    for key, value in changes.items():
        out[key] = shortened(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "gpu_cache")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "experiments.yaml"
    experiment = shortened(load_experiments(DEFAULT_CONFIG)[NAME], SHORT)
    header = f"# The shortened {NAME} of benchmarks/gpu_check.sh (written by benchmarks/make_gpu_run_cache.py)\n"
    config.write_text(header + yaml.safe_dump({NAME: experiment}, sort_keys=False))
    print(f"wrote {config}")
    return cli(["data", "--experiment", NAME, "--config", str(config), "--data-dir", str(args.out / "data")])


if __name__ == "__main__":
    raise SystemExit(main())
