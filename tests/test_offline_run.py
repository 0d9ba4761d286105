"""A run on a machine without OpenMM (the GPU machine of benchmarks/gpu_check.sh): ``bgflow-gate
data`` writes the dataset and the system snapshot where OpenMM is installed; ``train`` then
runs from that cache with the TorchEnergy, ``openmm`` never imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openmmtools")

from bgflow_gate.cli import main  # noqa: E402
from bgflow_gate.systems.snapshot import SNAPSHOT_FORMAT, SystemSnapshot, snapshot_path  # noqa: E402
from physical_parts import physical_parts  # noqa: E402
from tiny_runs import tiny_experiment  # noqa: E402

TINY = tiny_experiment(
    "tiny", model="{n_torsion_layers: 1, n_rest_layers: 1, hidden: 8, n_bins: 4}",
    training="{batch_size: 16, iters_per_epoch: 2, nll_epochs: 2, mixed_epochs: 2, warmup_epochs: 1}",
    energy="{backend: torch}",
)

TINY_KL = tiny_experiment(
    "tiny_kl", model="{kind: physical, rotors: backbone, n_torsion_layers: 1, n_rest_layers: 1, hidden: 8, n_bins: 4}",
    training="{route: kl_only, batch_size: 16, iters_per_epoch: 2, kl_epochs: 2, warmup_epochs: 0}",
    energy="{backend: torch}",
)

#: Makes openmm, openmmtools and mdtraj unimportable.
HIDE_OPENMM = "import sys; sys.modules.update(openmm=None, openmmtools=None, mdtraj=None); "
#: Runs ``bgflow-gate`` with OpenMM hidden.
WITHOUT_OPENMM = HIDE_OPENMM + "from bgflow_gate.cli import main; sys.exit(main(sys.argv[1:]))"

#: Builds the physical generator from the snapshot ``argv[1]`` with OpenMM hidden and saves
#: what must equal the generator built with OpenMM (:func:`physical_parts.physical_parts`) to ``argv[2]``.
PHYSICAL_WITHOUT_OPENMM = HIDE_OPENMM + """
import torch
from bgflow_gate.systems.snapshot import SystemSnapshot
from physical_parts import physical_parts
snapshot = SystemSnapshot.load(sys.argv[1])
torch.save(physical_parts(snapshot, snapshot.torch_energy(300.0)), sys.argv[2])
assert not any(sys.modules.get(m) for m in ("openmm", "openmmtools", "mdtraj"))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    (root / "experiments.yaml").write_text(TINY + TINY_KL)
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


def train_offline(cache, experiment: str, out) -> dict:
    """``bgflow-gate train`` of ``experiment`` with OpenMM hidden; its summary, after checking
    that it ran and trained on the snapshot's TorchEnergy."""
    argv = ["train", "--experiment", experiment, "--config", str(cache / "experiments.yaml"), "--data-dir",
            str(cache / "data"), "--out", str(out), "--quiet"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPENMM, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["energy"]["target"].startswith("energy: torch (OpenMM does not import here: TorchEnergy from")
    return summary


@pytest.mark.slow
def test_train_runs_from_the_cache_without_openmm(cache):
    summary = train_offline(cache, "tiny", cache / "run")
    assert set(summary["metrics"]) == {"md", "nll", "control", "mixed"}


def test_without_openmm_a_cache_without_snapshot_is_one_line_saying_what_to_run(cache, tmp_path):
    config = cache / "experiments.yaml"
    argv = ["train", "--experiment", "tiny", "--config", str(config), "--data-dir", str(tmp_path), "--out",
            str(tmp_path / "run"), "--quiet"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPENMM, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("write it where OpenMM is installed with 'bgflow-gate data --experiment tiny'")
    assert "alanine_vacuum_system.pt" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_physical_generator_built_from_the_snapshot_without_openmm_is_the_one_built_with_openmm(cache, tmp_path):
    from bgflow_gate.systems.alanine import alanine_dipeptide

    out = tmp_path / "offline.pt"
    done = subprocess.run([sys.executable, "-c", PHYSICAL_WITHOUT_OPENMM, str(snapshot_path(cache / "data", "vacuum")),
                           str(out)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    offline = torch.load(out, weights_only=True)
    system = alanine_dipeptide("vacuum")
    online = physical_parts(system, SystemSnapshot.load(snapshot_path(cache / "data", "vacuum")).torch_energy(300.0))
    assert offline["minimum"].dtype == torch.float64 and torch.equal(offline["minimum"], online["minimum"])
    assert [int(offline[k]["rotor_index"].numel()) for k in ("all", "backbone")] == [5, 2]
    for key in ("all", "backbone"):
        a, b = offline[key], online[key]
        assert torch.equal(a["z_matrix"], b["z_matrix"]) and torch.equal(a["rotor_index"], b["rotor_index"])
        assert a["weights"].keys() == b["weights"].keys()
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
        assert torch.equal(a["samples"], b["samples"])


def _old_format_copy(path, tmp_path):
    """A cache directory whose snapshot is ``path``'s in format 1 (no physical inputs)."""
    state = torch.load(path, weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("physical_")}
    state["format"] = "bgflow_gate.SystemSnapshot/1"
    (tmp_path / "data").mkdir()
    for dataset in path.parent.glob("alanine_vacuum_*.npz"):
        (tmp_path / "data" / dataset.name).write_bytes(dataset.read_bytes())
    torch.save(state, tmp_path / "data" / path.name)
    return tmp_path / "data" / path.name


def test_a_snapshot_of_the_older_format_says_to_write_it_again(cache, tmp_path):
    assert SNAPSHOT_FORMAT == "bgflow_gate.SystemSnapshot/2"
    old = _old_format_copy(snapshot_path(cache / "data", "vacuum"), tmp_path)
    with pytest.raises(ValueError, match="written by an older bgflow-gate .*'bgflow-gate data --experiment NAME' "
                                         "where OpenMM is installed$"):
        SystemSnapshot.load(old)
    argv = ["train", "--experiment", "tiny_kl", "--config", str(cache / "experiments.yaml"), "--data-dir",
            str(old.parent), "--out", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPENMM, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert str(old) in done.stderr
    assert done.stderr.strip().endswith("write it again with 'bgflow-gate data --experiment tiny_kl' where OpenMM "
                                        "is installed")


@pytest.mark.slow
def test_the_physical_generator_trains_from_the_cache_without_openmm(cache):
    summary = train_offline(cache, "tiny_kl", cache / "run_kl")
    assert summary["route"] == "kl_only" and set(summary["metrics"]) == {"md", "kl"}
