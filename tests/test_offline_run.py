"""A run on a machine without OpenMM (the GPU machine of benchmarks/gpu_check.sh): ``bgflow-gate
data`` writes the dataset and the system snapshot where OpenMM is installed; ``train`` then
runs from that cache with the TorchEnergy, ``openmm`` never imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openmmtools")

from bgflow_gate.cli import main  # noqa: E402
from bgflow_gate.systems.snapshot import SystemSnapshot, snapshot_path  # noqa: E402
from tiny_runs import tiny_experiment  # noqa: E402

TINY = tiny_experiment(
    "tiny", model="{n_torsion_layers: 1, n_rest_layers: 1, hidden: 8, n_bins: 4}",
    training="{batch_size: 16, iters_per_epoch: 2, nll_epochs: 2, mixed_epochs: 2, warmup_epochs: 1}",
    energy="{backend: torch}",
)

#: Runs ``bgflow-gate`` with openmm, openmmtools and mdtraj made unimportable.
WITHOUT_OPENMM = ("import sys; sys.modules.update(openmm=None, openmmtools=None, mdtraj=None); "
                  "from bgflow_gate.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    (root / "experiments.yaml").write_text(TINY)
    argv = ["data", "--experiment", "tiny", "--config", str(root / "experiments.yaml"), "--data-dir",
            str(root / "data"), "--quiet"]
    assert main(argv) == 0
    return root


def test_data_writes_a_snapshot_whose_torch_energy_matches_the_stored_energies(cache):
    snapshot = SystemSnapshot.load(snapshot_path(cache / "data", "vacuum"))
    assert snapshot.z_matrix.shape == (17, 4) and snapshot.rigid_block.tolist() == [6, 8, 9, 10, 14]
    (dataset,) = [np.load(p) for p in (cache / "data").glob("alanine_vacuum_*.npz")]
    x = torch.as_tensor(dataset["positions"][:5], dtype=torch.float64)
    energy = snapshot.torch_energy(300.0).potential(x).view(-1).numpy()
    assert np.abs(energy - dataset["energies"][:5]).max() < 1e-2


@pytest.mark.slow
def test_train_runs_from_the_cache_without_openmm(cache):
    out = cache / "run"
    argv = ["train", "--experiment", "tiny", "--config", str(cache / "experiments.yaml"), "--data-dir",
            str(cache / "data"), "--out", str(out), "--quiet"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPENMM, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["energy"]["target"].startswith("energy: torch (OpenMM does not import here: TorchEnergy from")
    assert set(summary["metrics"]) == {"md", "nll", "control", "mixed"}


def test_without_openmm_a_cache_without_snapshot_is_one_line_saying_what_to_run(cache, tmp_path):
    config = cache / "experiments.yaml"
    argv = ["train", "--experiment", "tiny", "--config", str(config), "--data-dir", str(tmp_path), "--out",
            str(tmp_path / "run"), "--quiet"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPENMM, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("write it where OpenMM is installed with 'bgflow-gate data --experiment tiny'")
    assert "alanine_vacuum_system.pt" in done.stderr and len(done.stderr.strip().splitlines()) == 1
