"""``bgflow-gate train``: a Boltzmann generator for alanine dipeptide, end to end.

Stages, each recorded in the run directory so that a killed run continues where it was:

1. ``data``: replica exchange (cached, see :mod:`bgflow_gate.systems.data`), split into a
   training part and a test part (the end of the trajectory).
2. The training stages of the experiment's ``training.route`` (:data:`ROUTE_STAGES`):

   * ``nll_then_mixed``: ``nll``, the generator trained by likelihood with the
     learning-rate warm-up; then ``control`` and ``mixed``, two continuations of the NLL
     model of equal length from the same weights and seed: NLL only (the fair control) and
     mixed NLL + KL with :class:`~bgflow_gate.ProgressiveKLTrainer` and the energy gate.
   * ``kl_only``: ``kl``, the physically initialised generator
     (:func:`~bgflow_gate.systems.physical.physical_generator`) trained by gated reverse KL
     alone; no MD frame enters training, the MD test frames only evaluate.

3. ``evaluation``: samples of every model against the MD test data (fraction below
   E_cut, phi/psi KL, Kish ESS, basin populations, free-energy difference between the
   phi < 0 and phi > 0 basins).
4. ``report``: ``summary.json`` and the plots (:mod:`bgflow_gate.report`).

The target of the gated stages and of the evaluation is the experiment's
``energy.backend`` (:func:`make_target`): a :class:`~bgflow_gate.TorchEnergy` on the run's
device, or OpenMM; the data always come from OpenMM. Where ``openmm`` does not import, a run
reads the system snapshot and the dataset from the data cache
(:mod:`bgflow_gate.systems.snapshot`) and uses the TorchEnergy.

Run directory
-------------
``.lock``          held by the process that runs it (a second process gets an error naming it);
``settings.json``  the resolved settings (a resumed run must match them);
``progress.json``  finished stages and their wall times;
``checkpoints/``   the trainer checkpoint of each training stage (written every epoch) and the
                   one before it (``<stage>.previous.pt``, the fall-back for a damaged one);
``models/``        the flow's weights at the end of each training stage;
``history_<stage>.csv``  the epoch history of each training stage;
``evaluation.npz`` the evaluated samples (for ``bgflow-gate report``);
``summary.json``, ``plots/``.

Under ``torchrun`` (a process group of N ranks) every rank trains its own batch of each step
with the flow wrapped in ``DistributedDataParallel`` (see :mod:`bgflow_gate.distributed`);
rank 0 generates the data first, writes every file and evaluates; the others read the data
cache, the models and checkpoints from the same run directory (a shared file system).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import ProgressiveKLTrainer, __version__, bg
from .distributed import Ranks
from .targets import generator_target
from .training import EarlyStopping, RollbackOnRise
from .units import kt_in_kjmol

__all__ = ["TRAINING_STAGES", "ROUTE_STAGES", "GATED_STAGES", "RunError", "RunDirectory", "RunLock",
           "train_experiment", "settings_to_json", "make_target", "SUMMARY_GLOSSARY"]

#: The training stages of each ``training.route``, in the order they run.
ROUTE_STAGES = {"nll_then_mixed": ("nll", "control", "mixed"), "kl_only": ("kl",)}
#: The training stages of the default route.
TRAINING_STAGES = ROUTE_STAGES["nll_then_mixed"]
#: The stages that train through the energy gate.
GATED_STAGES = ("mixed", "kl")


class RunError(ValueError):
    """A run directory cannot be used as asked (exists without ``--resume``, settings changed, ...)."""


def settings_to_json(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of :func:`~bgflow_gate.config.run_settings` as plain JSON values."""
    from dataclasses import asdict

    out = dict(settings)
    out["data"] = asdict(settings["data"])
    out["gate"] = {**settings["gate"], "schedule": settings["gate"]["schedule"].to_dict()}
    return json.loads(json.dumps(out))


#: The files a start that failed before any training leaves; a new start may replace them.
_RESTARTABLE = {".lock", "settings.json", "progress.json", "settings.json.tmp", "progress.json.tmp"}


class RunDirectory:
    """The files of one run (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    settings = property(lambda self: self.root / "settings.json")
    progress_file = property(lambda self: self.root / "progress.json")
    evaluation = property(lambda self: self.root / "evaluation.npz")
    summary = property(lambda self: self.root / "summary.json")
    plots = property(lambda self: self.root / "plots")

    def checkpoint(self, stage: str) -> Path:
        return self.root / "checkpoints" / f"{stage}.pt"

    def previous_checkpoint(self, stage: str) -> Path:
        """The checkpoint one epoch older than :meth:`checkpoint`, kept as its fall-back."""
        return self.root / "checkpoints" / f"{stage}.previous.pt"

    @property
    def finished(self) -> bool:
        """Whether the run was evaluated and its summary written."""
        return self.summary.is_file() and "evaluation" in self.read_progress()

    @property
    def holds_work(self) -> bool:
        """Whether starting afresh could lose anything: a finished training stage, or any file
        but the settings, progress and lock files that a start which failed early leaves
        (its data stage is only the cache)."""
        done = set(self.read_progress()) - {"data"}
        return bool(done) or any(p.name not in _RESTARTABLE for p in self.root.iterdir())

    def best_model(self, stage: str) -> Path:
        """The best weights of ``stage`` so far (early stopping: by test NLL; rollback: by KL loss)."""
        return self.root / "checkpoints" / f"{stage}_best.pt"

    def model(self, stage: str) -> Path:
        return self.root / "models" / f"{stage}.pt"

    def history(self, stage: str) -> Path:
        return self.root / f"history_{stage}.csv"

    def read_progress(self) -> dict[str, Any]:
        return json.loads(self.progress_file.read_text()) if self.progress_file.is_file() else {}

    def write_json(self, path: Path, value: Any) -> None:
        """Write JSON atomically (a temporary file, then a rename)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=2, allow_nan=False, default=_json_default))
        tmp.replace(path)

    def mark_done(self, stage: str, **info) -> None:
        progress = self.read_progress()
        progress[stage] = {"done": True, **info}
        self.write_json(self.progress_file, progress)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# -- set-up ---------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory (``.lock``, an advisory ``flock`` that the system
    releases when the process dies), so two processes never write one run. The file holds
    the holder's PID, which the error of a second process names."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / ".lock"
        self._file = None

    def acquire(self) -> None:
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunError(
                f"{self.path.parent} is in use by process {holder} (another 'bgflow-gate train' holds "
                f"{self.path}); wait for it to finish or stop it, or choose another --out"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def _writable_run(root: Path, resume: bool) -> None:
    """A clear error for an ``--out`` that is a file or cannot be written."""
    if root.exists() and not root.is_dir():
        raise RunError(f"--out {root} is a file; pass a directory for the run")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot create the run directory {root} ({err.strerror}); choose another --out") from None
    if not os.access(root, os.W_OK | os.X_OK):
        what = "resume it there" if resume else "start a run there"
        raise RunError(f"the run directory {root} is read-only; make it writable to {what}, or choose another --out")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"training.lr": 0.001, ...}``."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


#: What a run started before these settings existed did: it resumes with them (an old run
#: used OpenMM, so resuming one needs ``energy.backend: openmm``; the error says so).
_EARLIER_RUNS = {"model.kind": "spline", "model.rotors": "all", "training.route": "nll_then_mixed",
                 "training.kl_epochs": 400, "training.kl_lr_floor": None, "energy.backend": "openmm",
                 "training.mixed_lr_floor": None, "training.nll_patience": None, "model.rest_spline_bins": 0,
                 "training.rollback_tolerance": None}


def _changed_settings(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"training.lr: 0.001 in the run, 0.5 now"`` for every setting that differs."""
    old, new = {**_EARLIER_RUNS, **_flat(stored)}, _flat(wanted)
    missing = "(not set)"
    return [f"{key}: {old.get(key, missing)!r} in the run, {new.get(key, missing)!r} now"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def _check_resume(run: RunDirectory, wanted: dict[str, Any]) -> None:
    if not run.settings.is_file():
        raise RunError(f"nothing to resume in {run.root}: it holds no run (no settings.json)")
    stored = json.loads(run.settings.read_text())
    stored.pop("device", None)
    changed = _changed_settings(stored, wanted)
    if changed:
        raise RunError(
            f"the settings changed since the run in {run.root} began ({'; '.join(changed)}); resume with the "
            "experiment's original settings, or start a new run with another --out"
        )


def _prepare(run: RunDirectory, settings: dict[str, Any], resume: bool, lock: RunLock) -> None:
    """Check the run directory and take its lock; a new run writes its settings (a directory
    whose earlier start left no work, see :attr:`RunDirectory.holds_work`, is started afresh)."""
    wanted = settings_to_json(settings)
    wanted.pop("device")  # a run may continue on another device
    _writable_run(run.root, resume)
    lock.acquire()
    if resume:
        _check_resume(run, wanted)
        return
    if run.holds_work:
        raise RunError(
            f"{run.root} already holds files; pass --resume to continue the run there, or choose another --out"
        )
    run.progress_file.unlink(missing_ok=True)
    run.write_json(run.settings, {**wanted, "device": settings["device"]})


def _openmm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openmm") is not None


def make_target(system, temperature: float, energy: dict[str, Any]) -> tuple[Any, str]:
    """The target energy of the gated stages and the evaluation, and a one-line note of which
    backend was chosen and why.

    Parameters
    ----------
    system : AlanineDipeptide
    temperature : float
        K; the target's energies are in kT at it.
    energy : dict
        The ``energy`` settings: ``backend`` ``auto`` (a :class:`~bgflow_gate.TorchEnergy`
        where it supports every force of the system, else OpenMM), ``torch`` or ``openmm``
        (``platform``, ``n_workers``).

    Raises
    ------
    RunError
        ``backend: torch`` for a system with a force TorchEnergy does not support.
    """
    from .energies import TorchEnergy, UnsupportedForceError

    backend, why = energy["backend"], "energy.backend openmm"
    if backend != "openmm":
        try:
            target = TorchEnergy.from_openmm(system.system, temperature=temperature)
        except UnsupportedForceError as err:
            if backend == "torch":
                raise RunError(f"energy.backend torch: {err}; use energy.backend openmm") from None
            why = f"energy.backend auto, and TorchEnergy does not support this system ({err})"
        else:
            reason = "energy.backend torch" if backend == "torch" else \
                "energy.backend auto, and TorchEnergy supports every force of this system"
            return target, f"energy: torch (TorchEnergy on the run's device; {reason})"
    target = system.energy(temperature, platform_name=energy["platform"], n_workers=energy["n_workers"])
    return target, f"energy: openmm (platform {energy['platform']}, {energy['n_workers']} worker(s); {why})"


def _offline_system(settings: dict[str, Any], data_dir: Path):
    """Without OpenMM: the snapshot, the cached dataset and the TorchEnergy from ``data_dir``."""
    from .systems.snapshot import SystemSnapshot, load_offline_dataset, snapshot_path

    data, backend = settings["data"], settings["energy"]["backend"]
    if backend == "openmm":
        raise RunError("energy.backend openmm needs OpenMM, which does not import here; use energy.backend torch")
    path = snapshot_path(data_dir, data.solvent)
    redo = f"write it where OpenMM is installed with 'bgflow-gate data --experiment {settings['name']}'"
    try:  # the snapshot also holds the physical generator's inputs (z-matrix, bonds, minimum)
        snapshot = SystemSnapshot.load(path, experiment=settings["name"])
        target = snapshot.torch_energy(data.t_min)
        dataset = load_offline_dataset(data, data_dir, target)
    except FileNotFoundError as err:
        raise RunError(f"OpenMM does not import here and the data cache lacks a file ({err}); {redo}") from None
    note = f"energy: torch (OpenMM does not import here: TorchEnergy from the snapshot {path})"
    return snapshot, dataset, target, note


class RunContext:
    """The data, the system and the target shared by all stages of one run."""

    def __init__(self, settings: dict[str, Any], data_dir: str | Path | None, log: Callable[[str], None],
                 progress: bool, ranks: Ranks):
        self.settings, self.ranks, self.log = settings, ranks, log
        device = torch.device(settings["device"])
        if device.type == "cuda" and ranks.distributed:  # each rank on its own GPU (LOCAL_RANK)
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.dtype = getattr(torch, settings["model"]["dtype"])
        self.temperature = settings["data"].t_min
        self.route = settings["training"]["route"]
        self.stages = ROUTE_STAGES[self.route]
        start = time.perf_counter()
        if _openmm_available():
            self._load_with_openmm(data_dir, progress)
        else:
            from .systems.data import default_data_dir

            directory = Path(data_dir) if data_dir is not None else default_data_dir()
            self.system, self.dataset, self.target, self.energy_note = _offline_system(settings, directory)
        self.data_seconds = time.perf_counter() - start
        self._split()
        self._minimum = None
        log(self.energy_note)

    def _load_with_openmm(self, data_dir, progress: bool) -> None:
        from .systems.alanine import alanine_dipeptide
        from .systems.data import generate_dataset

        data = self.settings["data"]
        self.dataset = self.ranks.on_main(lambda: generate_dataset(data, data_dir, progress=progress))
        if self.dataset is None:  # the other ranks read rank 0's cache
            self.dataset = generate_dataset(data, data_dir, progress=False)
        self.system = alanine_dipeptide(data.solvent)
        self.target, self.energy_note = make_target(self.system, self.temperature, self.settings["energy"])

    def _split(self) -> None:
        """Training and test frames; the ``kl_only`` route trains on none (``train`` is ``None``)."""
        t, ranks = self.settings["training"], self.ranks
        train, test = self.dataset.split(t["test_fraction"])
        self.train = None if self.route == "kl_only" else torch.as_tensor(train, dtype=self.dtype, device=self.device)
        self.test = torch.as_tensor(test, dtype=self.dtype, device=self.device)
        # default: one pass over the training data by all ranks together
        self.iters_per_epoch = t["iters_per_epoch"] or max(1, len(self.train) // (t["batch_size"] * ranks.size))
        used = "none used for training (kl_only)" if self.train is None else f"{len(self.train)} training"
        self.log(
            f"data: {self.dataset.path} ({'cache' if self.dataset.from_cache else 'generated'}), "
            f"{used} / {len(self.test)} test frames; "
            f"{self.iters_per_epoch} iterations per epoch, device {self.device}"
            + (f", {ranks.size} ranks ({ranks.backend}), batch {t['batch_size']} per rank" if ranks.distributed else "")
        )

    @property
    def train_frames(self) -> int:
        """Frames the training stages see (0 on the ``kl_only`` route)."""
        return 0 if self.train is None else len(self.train)

    def _build_generator(self):
        """A fresh generator of the experiment's ``model.kind`` on the run's device."""
        m = self.settings["model"]
        sizes = dict(n_torsion_layers=m["n_torsion_layers"], n_rest_layers=m["n_rest_layers"], hidden=m["hidden"],
                     n_bins=m["n_bins"], rest_spline_bins=m["rest_spline_bins"])
        if m["kind"] == "physical":
            from .systems.physical import ALL_ROTORS, BACKBONE_ROTORS, physical_generator, physical_inputs

            if self._minimum is None:  # the same structure for every generator (without OpenMM: the snapshot's)
                self._minimum = physical_inputs(self.system).minimum
            rotors = ALL_ROTORS if m["rotors"] == "all" else BACKBONE_ROTORS
            gen = physical_generator(self.system, self.target, rotors=rotors, positions=self._minimum,
                                     dtype=self.dtype, **sizes)
        else:
            from .systems.generators import spline_generator

            gen = spline_generator(self.system, self.train.cpu(), self.target, **sizes)
        return gen.to(self.device)

    def generator(self, weights: Path | None = None, parallel: bool = True):
        """A fresh generator (same architecture and coordinate transform every time), with
        the flow's ``weights`` when given, and its bare flow. Under a process group and with
        ``parallel`` the generator's flow is wrapped in ``DistributedDataParallel``."""
        gen = self._build_generator()
        flow = gen.flow
        if weights is not None:
            flow.load_state_dict(torch.load(weights, map_location=self.device))
        if parallel and self.ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            gen = bg.BoltzmannGenerator(
                gen.prior, DistributedDataParallel(flow, device_ids=ids, process_group=self.ranks.group),
                generator_target(gen),
            )
        return gen, flow

    def close(self) -> None:
        close = getattr(self.target, "close", None)  # OpenMM's workers; a TorchEnergy holds none
        if close is not None:
            close()


def _epoch_logger(stage: str, n_epochs: int, log: Callable[[str], None]):
    """An ``on_epoch_end`` callback that logs one line per finished epoch, with the time left."""
    start, first = time.perf_counter(), None

    def report(trainer: ProgressiveKLTrainer, record: dict) -> None:
        nonlocal first
        first = len(trainer.history) - 1 if first is None else first
        done = len(trainer.history) - first
        left = (time.perf_counter() - start) / done * (n_epochs - len(trainer.history))
        log(f"[{stage}] {trainer.summary_line(record)}  (~{left:.0f} s left)")
        for action in record["actions"]:
            log(f"[{stage}] {action}")

    return report


class _StageTrainer(ProgressiveKLTrainer):
    """The trainer of a stage: before each checkpoint it writes, the one before is kept as
    ``<stage>.previous.pt`` (a hard link, or a copy), so a damaged checkpoint has a fall-back."""

    def __init__(self, *args, keep_previous: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_previous = keep_previous

    def save_checkpoint(self, path: str | Path) -> Path:
        path = Path(path)
        if self.keep_previous and path.is_file():
            _keep_copy(path, path.with_name(path.stem + ".previous.pt"))
        return super().save_checkpoint(path)


def _keep_copy(path: Path, copy: Path) -> None:
    """Make ``copy`` hold what ``path`` holds now, atomically."""
    import shutil

    tmp = copy.with_name(copy.name + f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system
        shutil.copy2(path, tmp)
    os.replace(tmp, copy)


class CosineLR:
    """Cosine decay of every group's learning rate from ``lr`` to ``lr * floor`` over
    ``total`` iterations, stepped once per iteration (after the optimiser step).

    It derives the rate from the iteration count alone, so a stage resumed at iteration
    ``start`` continues on exactly the rates of an uninterrupted one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, floor: float, total: int, start: int = 0):
        self.optimizer, self.lr, self.floor, self.total, self.iteration = optimizer, lr, floor, max(total, 1), start
        self._apply()

    def rate(self, iteration: int) -> float:
        """The learning rate of ``iteration``."""
        progress = min(iteration, self.total) / self.total
        return self.lr * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.rate(self.iteration)

    def step(self) -> None:
        self.iteration += 1
        self._apply()


def _stage_lr(stage: str, t: dict[str, Any]) -> float:
    return t["mixed_lr"] if stage in ("control", "mixed") else t["lr"]


def _gate_arguments(ctx: RunContext) -> dict[str, Any]:
    """The gate's keyword arguments of a gated stage (``gate=False`` without gating)."""
    g = ctx.settings["gate"]
    if not ctx.settings["use_energy_gating"]:
        return {"gate": False}
    return dict(schedule=g["schedule"], e_cut=g["e_cut"], adaptive_quantile=g["adaptive_quantile"],
                above_cut=g["above_cut"])


def _stage_trainer(stage: str, ctx: RunContext, run: RunDirectory, gen) -> tuple[ProgressiveKLTrainer, dict]:
    """The trainer of ``stage`` and the weights its ``train()`` call takes."""
    t = ctx.settings["training"]
    optim = torch.optim.Adam(gen.parameters(), lr=_stage_lr(stage, t))
    common = dict(
        iters_per_epoch=ctx.iters_per_epoch, checkpoint_every=1, checkpoint_path=run.checkpoint(stage),
        max_grad_norm=t["max_grad_norm"], keep_previous=ctx.ranks.is_main,
        lr_warmup_epochs=t["warmup_epochs"] if stage in ("nll", "kl") else 0.0,
    )
    if stage in ("nll", "control"):
        return _StageTrainer(gen, optim, train_energy=False, **common), {}
    policy = dict(skip_policy=t["skip_policy"], min_keep_fraction=t["min_keep_fraction"], on_stall=t["on_stall"])
    weights = dict(clip_forces=t["clip_forces"])
    if stage == "kl":  # reverse KL alone: no data, no likelihood term
        trainer = _StageTrainer(gen, optim, train_likelihood=False, **_gate_arguments(ctx), **policy, **common)
        return trainer, dict(w_likelihood=0.0, w_energy=1.0, **weights)
    trainer = _StageTrainer(gen, optim, **_gate_arguments(ctx), **policy, **common)
    return trainer, dict(w_likelihood=t["w_likelihood"], w_energy=t["w_energy"], **weights)


def _loadable(path: Path) -> str | None:
    """``None`` if the checkpoint at ``path`` reads, otherwise why not."""
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways (EOF, unpickling, zip)
        return " ".join(str(err).split())[:120] or type(err).__name__
    return None


def _checkpoint_to_resume(stage: str, run: RunDirectory, log: Callable[[str], None]) -> Path | None:
    """The checkpoint a stage continues from: its latest, or, when that one is damaged, the
    one before (the damaged file is kept as ``<stage>.pt.damaged`` and a warning logged)."""
    latest, previous = run.checkpoint(stage), run.previous_checkpoint(stage)
    if not latest.is_file():
        return None
    problem = _loadable(latest)
    if problem is None:
        return latest
    latest.replace(latest.with_name(latest.name + ".damaged"))
    if previous.is_file() and _loadable(previous) is None:
        log(f"[{stage}] warning: checkpoint {latest} is damaged ({problem}); kept as {latest.name}.damaged, "
            f"continuing from the one before it, {previous}")
        return previous
    log(f"[{stage}] warning: checkpoint {latest} is damaged ({problem}) and there is no usable earlier one; "
        f"kept as {latest.name}.damaged, the stage starts again")
    return None


def _stage_epochs(stage: str, t: dict[str, Any]) -> int:
    return {"nll": t["nll_epochs"], "kl": t["kl_epochs"]}.get(stage, t["mixed_epochs"])


def _lr_schedulers(stage: str, trainer: ProgressiveKLTrainer, t: dict[str, Any], n_epochs: int) -> list:
    """The per-iteration schedulers of a stage: the cosine decay of the kl stage (``kl_lr_floor``)
    and of the mixed stage and its control alike (``mixed_lr_floor``)."""
    floor = {"kl": t["kl_lr_floor"], "mixed": t["mixed_lr_floor"], "control": t["mixed_lr_floor"]}.get(stage)
    if floor is None:
        return []
    total = n_epochs * trainer.iters_per_epoch
    return [(1, CosineLR(trainer.optim, _stage_lr(stage, t), floor, total, start=trainer.iteration))]


def _early_stopping(stage: str, ctx: RunContext, run: RunDirectory) -> EarlyStopping | None:
    """The nll stage's early stopping on the test frames (``training.nll_patience``)."""
    patience = ctx.settings["training"]["nll_patience"]
    if stage != "nll" or patience is None:
        return None
    return EarlyStopping(ctx.test, patience, path=run.best_model(stage), write=ctx.ranks.is_main)


def _rollback(stage: str, trainer: ProgressiveKLTrainer, ctx: RunContext, run: RunDirectory) -> RollbackOnRise | None:
    """A gated stage's rollback to its lowest KL loss (``training.rollback_tolerance``), compared
    from the epoch where the gate's schedule reaches its final E_max."""
    tolerance = ctx.settings["training"]["rollback_tolerance"]
    if stage not in GATED_STAGES or tolerance is None:
        return None
    start = 0 if trainer.gate is None else math.ceil(trainer.gate.schedule.stages()[-1][1])
    return RollbackOnRise(tolerance, start_epoch=start, path=run.best_model(stage), write=ctx.ranks.is_main)


def _train_stage(stage: str, ctx: RunContext, run: RunDirectory, log: Callable[[str], None]) -> dict[str, Any]:
    t = ctx.settings["training"]
    n_epochs = _stage_epochs(stage, t)
    first = stage in ("nll", "kl")  # a route's first stage starts from the untrained generator
    torch.manual_seed(t["seed"] if first else t["seed"] + 1)
    gen, flow = ctx.generator(None if first else run.model("nll"))
    trainer, weights = _stage_trainer(stage, ctx, run, gen)
    path = ctx.ranks.broadcast(_checkpoint_to_resume(stage, run, log) if ctx.ranks.is_main else None)
    if path is not None:
        trainer.resume(path)
        log(f"[{stage}] resumed from {path} at epoch {len(trainer.history)}")
    stopping, rollback = _early_stopping(stage, ctx, run), _rollback(stage, trainer, ctx, run)
    remaining = n_epochs - len(trainer.history)
    if remaining > 0 and not (stopping and stopping.exhausted(len(trainer.history) - 1)):
        trainer.train(
            n_epochs=remaining, data=ctx.train, batchsize=t["batch_size"],
            schedulers=_lr_schedulers(stage, trainer, t, n_epochs),
            on_epoch_end=[c for c in (rollback, stopping, _epoch_logger(stage, n_epochs, log)) if c], **weights,
        )
    if stopping is not None:
        stopping.restore(gen)
        log(f"[{stage}] kept epoch {stopping.best_epoch + 1} (test NLL {stopping.best:.3f}; "
            f"{len(trainer.history)} epochs trained, patience {stopping.patience})")

    def write():
        trainer.write_history(run.history(stage))
        run.model(stage).parent.mkdir(parents=True, exist_ok=True)
        torch.save(flow.state_dict(), run.model(stage))

    ctx.ranks.on_main(write)
    return _stage_info(stage, trainer)


def _stage_info(stage: str, trainer: ProgressiveKLTrainer) -> dict[str, Any]:
    """What ``progress.json`` records of a finished training stage."""
    history = trainer.history
    info = {
        "epochs": len(history),
        "iterations": trainer.iteration,
        "seconds": float(sum(r["seconds"] for r in history)),
        "final_nll": _finite_or_none(history[-1]["nll"]),
    }
    if stage in GATED_STAGES:
        highest = [r["energy_max"] for r in history if r["energy_max"] is not None and math.isfinite(r["energy_max"])]
        info.update(
            batches_skipped=int(sum(r["batches_skipped"] for r in history)),
            batches=int(sum(r["batches"] for r in history)),
            final_e_max_kjmol=_finite_or_none(history[-1]["e_max"]),
            raw_energy_max_kjmol={"first_epoch": highest[0] if highest else None,
                                  "last_epoch": highest[-1] if highest else None},
            actions=[a for r in history for a in r["actions"]],
            alerts=[a for r in history for a in r["alerts"]],
        )
    return info


# -- evaluation -------------------------------------------------------------------------


def _sample(ctx: RunContext, stage: str, run: RunDirectory, n: int, chunk: int = 2048):
    """Samples of a stage's model: coordinates, energies (kJ/mol; the run's target on the
    coordinates in float64) and log weights."""
    gen, _ = ctx.generator(run.model(stage), parallel=False)
    kt = kt_in_kjmol(ctx.temperature)
    xs, energies, logw = [], [], []
    torch.manual_seed(ctx.settings["training"]["seed"] + 2)
    with torch.no_grad():
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z = gen.prior.sample(m)
            *x, dlogp = gen.flow(z)
            x = x[0]
            u = ctx.target.energy(x.double()).view(-1).double()
            lw = -u + gen.prior.energy(z).view(-1).double() + dlogp.view(-1).double()
            xs.append(x.double().cpu())
            energies.append((u * kt).cpu())
            logw.append(lw.cpu())
    return torch.cat(xs), torch.cat(energies).numpy(), torch.cat(logw).numpy()


def _evaluate(ctx: RunContext, run: RunDirectory, log: Callable[[str], None]) -> dict[str, Any]:
    from .systems.alanine import phi_psi
    from .report import format_delta_f, format_number
    from .systems.analysis import md_metrics, sample_metrics

    ev, e_cut = ctx.settings["evaluation"], ctx.settings["gate"]["e_cut"]
    kt = kt_in_kjmol(ctx.temperature)
    test = ctx.test.double().cpu()
    arrays: dict[str, np.ndarray] = {}
    phi, psi = (a.numpy() for a in phi_psi(test))
    test_energies = ctx.dataset.energies[-len(test):]
    arrays.update(md_phi=phi, md_psi=psi, md_energy=test_energies)
    metrics = {"md": md_metrics(phi, psi, kt, energies=test_energies)}
    md = metrics["md"]
    log(f"[evaluation] MD test frames: dF(phi>0 - phi<0) {format_delta_f(md)} kJ/mol (standard error, time "
        f"correlation counted: g = {md['phi_sign_statistical_inefficiency']:.1f}), energy 99.9th percentile "
        f"{format_number(md['energy_p999_kjmol'], '.4g')} kJ/mol")
    for stage in ctx.stages:
        x, energy, logw = _sample(ctx, stage, run, ev["n_samples"])
        metrics[stage] = sample_metrics(x, energy, logw, test, kt=kt, e_cut=e_cut, bins=ev["bins"],
                                        reference_energies=test_energies)
        sphi, spsi = (a.numpy() for a in phi_psi(x))
        arrays.update({f"{stage}_phi": sphi, f"{stage}_psi": spsi, f"{stage}_energy": energy, f"{stage}_logw": logw})
        log(f"[evaluation] {stage}: {_evaluation_line(metrics[stage])}")
    np.savez_compressed(run.evaluation, **arrays)
    return metrics


def _evaluation_line(m: dict[str, Any]) -> str:
    """One model's metrics in the evaluation's log line, the energy distances to MD first."""
    from .report import format_delta_f, format_number

    return (
        f"energy W1 to MD {format_number(m['energy_wasserstein_kjmol'], '.3g')} kJ/mol (reweighted), "
        f"{100 * m['beyond_md_energy_p999']:.2f} % beyond MD's 99.9th energy percentile (MD: 0.1 %), "
        f"ESS {m['ess_percent']:.3g} % (95 % interval {m['ess_percent_ci95'][0]:.3g}-{m['ess_percent_ci95'][1]:.3g}; "
        f"fifths {min(m['ess_percent_blocks']):.3g}-{max(m['ess_percent_blocks']):.3g}), "
        f"dF(phi>0 - phi<0) {format_delta_f(m)} kJ/mol, phi/psi KL {m['phi_psi_kl']:.3f}, "
        f"{100 * m['below_e_cut']:.1f} % below E_cut, median energy {m['energy_median_kjmol']:.4g} kJ/mol"
    )


#: How far the phi/psi KL of one model moves between two sets of its samples (60 x 60 bins,
#: measured, DESIGN.md): differences below it are noise.
PHI_PSI_KL_NOISE = 0.1

#: What the less obvious entries of ``summary.json`` mean (written into it as ``glossary``).
SUMMARY_GLOSSARY = {
    "energy_wasserstein_kjmol": "1-D Wasserstein distance (kJ/mol) between the model's reweighted energy distribution "
                                "and the MD test frames' energies; 0 is identical (it rests on the effective samples)",
    "beyond_md_energy_p999": "fraction of the model's samples (unweighted) with an energy above the 99.9th percentile "
                             "of the MD test frames' energies (or not finite); a Boltzmann sampler has ~0.001",
    "below_e_cut": "fraction of the model's samples whose energy lies below E_cut (saturates near 1 for any trained "
                   "model: see energy_wasserstein_kjmol and beyond_md_energy_p999)",
    "phi_psi_kl": "KL(MD test frames || samples) of the phi/psi histograms; 0 is identical",
    "effective_samples": "Kish's effective sample size of the importance weights exp(-u(x)) / q(x), in samples: "
                         "how many samples from the true distribution the weighted samples are worth",
    "ess_percent": "effective_samples as a percentage of the samples drawn",
    "ess_percent_ci95": "a bootstrap 95 % interval of ess_percent (200 resamplings of the samples)",
    "ess_percent_blocks": "the ESS in percent of each fifth of the samples (five independent sets); a spread much "
                          "wider than ess_percent_ci95 means a heavy tail of weights (rare samples with large "
                          "weights), which the bootstrap cannot see",
    "basins_reweighted": "basin populations after importance reweighting; meaningful only when "
                         "reweighting_reliable is true",
    "delta_f_phi_kjmol": "F(phi > 0) - F(phi < 0) in kJ/mol; for a model: from its reweighted samples, meaningful "
                         "only when reweighting_reliable is true",
    "delta_f_phi_ci95_kjmol": "95 % interval of delta_f_phi_kjmol; for a model: the 2.5th and 97.5th percentiles of "
                              "200 bootstrap resamplings of its samples (null end: a resampling emptied a side); "
                              "for MD: +- 1.96 delta_f_phi_se_kjmol",
    "delta_f_phi_se_kjmol": "standard error of delta_f_phi_kjmol; for a model: the bootstrap's standard deviation; for "
                            "MD: kT / sqrt(p (1 - p) N / g), g the statistical inefficiency of the time series phi >= 0 "
                            "(phi_sign_statistical_inefficiency)",
    "reweighting_reliable": "effective_samples >= 100: reweighted fractions then have a standard error of at most "
                            "~5 points (with fewer, they rest on a handful of samples)",
    "phi_psi_kl_noise": "how far the phi/psi KL of one model moves between two sets of its samples; "
                        "a phi/psi KL change below it is noise",
    "below_e_cut_gain_standard_error": "standard error of below_e_cut_gain (two independent sets of samples)",
    "beyond_md_energy_p999_change_standard_error": "standard error of beyond_md_energy_p999_change (two independent "
                                                   "sets of samples)",
}


def _comparison(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The mixed model against the NLL-only control: it helps when fewer of its samples lie
    beyond MD's 99.9th energy percentile and its ESS is larger, with a phi/psi KL no worse than
    the control's beyond the noise of resampling (:data:`PHI_PSI_KL_NOISE`). The fractions'
    changes come with their standard errors; the reweighted energy Wasserstein distance's
    change is reported too. ``None`` on a route without a control (``kl_only``)."""
    if "mixed" not in metrics or "control" not in metrics:
        return None
    mixed, control = metrics["mixed"], metrics["control"]

    def change(key: str) -> tuple[float | None, float | None]:
        if mixed.get(key) is None or control.get(key) is None:
            return None, None
        # standard error of the difference of two fractions from independent samples
        se = math.sqrt(sum(m[key] * (1 - m[key]) / m["samples"] for m in (mixed, control)))
        return mixed[key] - control[key], se

    (tail, tail_se), (below, below_se) = change("beyond_md_energy_p999"), change("below_e_cut")
    w1 = (None if mixed.get("energy_wasserstein_kjmol") is None or control.get("energy_wasserstein_kjmol") is None
          else mixed["energy_wasserstein_kjmol"] - control["energy_wasserstein_kjmol"])
    out = {
        "beyond_md_energy_p999_change": tail, "beyond_md_energy_p999_change_standard_error": tail_se,
        "energy_wasserstein_change_kjmol": w1,
        "below_e_cut_gain": below, "below_e_cut_gain_standard_error": below_se,
        "ess_percent_gain": mixed["ess_percent"] - control["ess_percent"],
        "phi_psi_kl_change": mixed["phi_psi_kl"] - control["phi_psi_kl"],
        "phi_psi_kl_noise": PHI_PSI_KL_NOISE,
    }
    out["below_e_cut_gain_significant"] = bool(below > 2 * below_se)
    energy_better = tail < 0 if tail is not None else below > 0
    out["mixed_helps"] = bool(
        energy_better and out["ess_percent_gain"] > 0 and out["phi_psi_kl_change"] <= PHI_PSI_KL_NOISE
    )
    return out


def _targets(metrics: dict[str, Any], final_stage: str) -> dict[str, Any]:
    """The targets, checked on the route's final model (``beyond_md_energy_p999``: at most ten
    times a Boltzmann sampler's 0.1 %; the ESS: issue 13's 10 %)."""
    m = metrics[final_stage]
    basins = m["basins"]
    tail = m.get("beyond_md_energy_p999")
    return {
        "beyond_md_energy_p999_at_most_1_percent": bool(tail is not None and tail <= 0.01),
        "ess_at_least_10_percent": bool(m["ess_percent"] >= 10.0),
        "below_e_cut_at_least_95_percent": bool(m["below_e_cut"] >= 0.95),
        "both_phi_negative_basins_populated": bool(basins["C5/beta"] > 0 and basins["C7eq/alphaR"] > 0),
        "phi_psi_kl_below_0.5": bool(m["phi_psi_kl"] < 0.5),
    }


# -- the whole run --------------------------------------------------------------------


def train_experiment(
    settings: dict[str, Any], out_dir: str | Path, *, data_dir: str | Path | None = None, resume: bool = False,
    progress: bool = True, log: Callable[[str], None] = print, ranks: Ranks | None = None,
) -> dict[str, Any] | None:
    """Run (or, with ``resume``, continue) an experiment; returns the summary.

    The run directory is locked while the run lasts (:class:`RunLock`); resuming a finished
    run only says so and returns its summary. Under a process group every rank calls it;
    rank 0 returns the summary, the others ``None`` (rank 0 evaluates alone).

    Parameters
    ----------
    settings : dict
        From :func:`bgflow_gate.config.run_settings`.
    out_dir : str or Path
        The run directory (created; must hold no run unless ``resume``).
    data_dir : str or Path, optional
        The data cache (default: :func:`~bgflow_gate.systems.data.default_data_dir`).
    resume : bool
        Continue the run in ``out_dir`` from its last checkpoint.
    progress : bool
        Show the replica exchange's progress line.
    log : callable
        Receives one line per epoch and per stage (and which energy backend, and why).
    ranks : Ranks, optional
        The process group (default: the initialised default group, else one process).

    Raises
    ------
    RunError
        The run directory cannot be used as asked; the message says why and what to do.
    """
    ranks = ranks if ranks is not None else Ranks.default()
    run, lock = RunDirectory(out_dir), RunLock(out_dir)
    try:
        ranks.on_main(lambda: _prepare(run, settings, resume, lock))
        if ranks.broadcast(run.finished if ranks.is_main else None):
            log(f"the run in {run.root} finished earlier; nothing to resume ('bgflow-gate report {run.root}' "
                "re-draws its plots)")
            from .report import read_summary

            return read_summary(run.root) if ranks.is_main else None
        return _run(run, settings, data_dir, progress, log, ranks)
    finally:
        lock.release()


def _run(run: RunDirectory, settings: dict[str, Any], data_dir, progress: bool, log: Callable[[str], None],
         ranks: Ranks) -> dict[str, Any] | None:
    """The stages of a prepared run directory; the summary (rank 0) or ``None``."""
    from .report import draw_plots

    ctx = RunContext(settings, data_dir, log, progress, ranks)
    try:
        # rank 0's view of the run decides for every rank (rank 0 writes progress.json)
        done = ranks.broadcast(run.read_progress() if ranks.is_main else None)
        if "data" not in done:
            ranks.on_main(lambda: run.mark_done(
                "data", seconds=ctx.data_seconds, cached=ctx.dataset.from_cache, path=str(ctx.dataset.path)
            ))
        for stage in ctx.stages:
            if stage in done:
                log(f"[{stage}] finished earlier, skipped")
                continue
            info = _train_stage(stage, ctx, run, log)
            ranks.on_main(lambda: run.mark_done(stage, **info))
        if not ranks.is_main:
            return None
        start = time.perf_counter()
        metrics = _evaluate(ctx, run, log)
        run.mark_done("evaluation", seconds=time.perf_counter() - start)
    finally:
        ctx.close()
    summary = _summary(ctx, run, metrics)
    run.write_json(run.summary, summary)
    draw_plots(run.root)
    log(f"summary: {run.summary}; plots: {run.plots}")
    return summary


def _summary(ctx: RunContext, run: RunDirectory, metrics: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``summary.json``."""
    settings, progress_info = ctx.settings, run.read_progress()
    return {
        "experiment": settings["name"],
        "version": __version__,
        "host": bg.HOST,
        "torch": torch.__version__,
        "device": settings["device"],
        "route": ctx.route,
        "energy": {"target": ctx.energy_note, "evaluation": "the same target, on float64 coordinates"},
        "threads": torch.get_num_threads(),
        "use_energy_gating": settings["use_energy_gating"],
        "e_cut_kjmol": settings["gate"]["e_cut"],
        "temperature_k": ctx.temperature,
        "data": {
            "path": str(ctx.dataset.path), "train_frames": ctx.train_frames, "test_frames": len(ctx.test),
            "generated_seconds": _finite_or_none(ctx.dataset.seconds),
        },
        "stages": progress_info,
        "wall_seconds": {k: v.get("seconds") for k, v in progress_info.items()},
        "metrics": metrics,
        "mixed_vs_control": _comparison(metrics),
        "targets": _targets(metrics, ctx.stages[-1]),
        "glossary": SUMMARY_GLOSSARY,
    }
