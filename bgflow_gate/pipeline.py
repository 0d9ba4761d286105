"""``bgflow-gate train``: a Boltzmann generator for alanine dipeptide, end to end.

Stages, each recorded in the run directory so that a killed run continues where it was:

1. ``data``: replica exchange (cached, see :mod:`bgflow_gate.systems.data`), split into a
   training part and a test part (the end of the trajectory).
2. ``nll``: the spline generator (:func:`~bgflow_gate.systems.generators.spline_generator`)
   trained by likelihood, with the learning-rate warm-up.
3. ``control`` and ``mixed``: two continuations of the NLL model of equal length, from the
   same weights and seed: NLL only (the fair control) and mixed NLL + KL with
   :class:`~bgflow_gate.ProgressiveKLTrainer` and the energy gate.
4. ``evaluation``: samples of the three models against the MD test data (fraction below
   E_cut, phi/psi KL, Kish ESS, basin populations, free-energy difference between the
   phi < 0 and phi > 0 basins).
5. ``report``: ``summary.json`` and the plots (:mod:`bgflow_gate.report`).

Run directory
-------------
``settings.json``  the resolved settings (a resumed run must match them);
``progress.json``  finished stages and their wall times;
``checkpoints/``   the trainer checkpoint of each training stage (written every epoch);
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
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from . import __version__, bg
from .distributed import Ranks
from .trainer import ProgressiveKLTrainer
from .units import kt_in_kjmol

__all__ = ["TRAINING_STAGES", "RunError", "RunDirectory", "train_experiment", "settings_to_json"]

#: The training stages in the order they run.
TRAINING_STAGES = ("nll", "control", "mixed")


class RunError(ValueError):
    """A run directory cannot be used as asked (exists without ``--resume``, settings changed, ...)."""


def settings_to_json(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of :func:`~bgflow_gate.config.run_settings` as plain JSON values."""
    from dataclasses import asdict

    out = dict(settings)
    out["data"] = asdict(settings["data"])
    out["gate"] = {**settings["gate"], "schedule": settings["gate"]["schedule"].to_dict()}
    return json.loads(json.dumps(out))


class RunDirectory:
    """The files of one run (see the module docstring)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    settings = property(lambda self: self.root / "settings.json")
    progress_file = property(lambda self: self.root / "progress.json")
    evaluation = property(lambda self: self.root / "evaluation.npz")
    summary = property(lambda self: self.root / "summary.json")
    plots = property(lambda self: self.root / "plots")

    def checkpoint(self, stage: str) -> Path:
        return self.root / "checkpoints" / f"{stage}.pt"

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


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


# -- set-up ---------------------------------------------------------------------------


def _prepare(run: RunDirectory, settings: dict[str, Any], resume: bool) -> None:
    wanted = settings_to_json(settings)
    wanted.pop("device")  # a run may continue on another device
    if resume:
        if not run.settings.is_file():
            raise RunError(f"nothing to resume in {run.root}: it holds no run (no settings.json)")
        stored = json.loads(run.settings.read_text())
        stored.pop("device", None)
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise RunError(
                f"the settings changed since the run in {run.root} began (sections: {', '.join(changed)}); "
                "resume with the experiment's original settings, or start a new run with another --out"
            )
        return
    if run.root.exists() and any(run.root.iterdir()):
        raise RunError(
            f"{run.root} already holds files; pass --resume to continue the run there, or choose another --out"
        )
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_json(run.settings, {**wanted, "device": settings["device"]})


class _RunContext:
    """The data, the system and the target shared by all stages of one run."""

    def __init__(self, settings: dict[str, Any], data_dir: Union[str, Path], log: Callable[[str], None], progress: bool,
                 ranks: Ranks):
        from .systems.alanine import alanine_dipeptide
        from .systems.data import generate_dataset

        self.settings = settings
        self.ranks = ranks
        device = torch.device(settings["device"])
        if device.type == "cuda" and ranks.distributed:  # each rank on its own GPU (LOCAL_RANK)
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.dtype = getattr(torch, settings["model"]["dtype"])
        start = time.perf_counter()
        self.dataset = ranks.on_main(lambda: generate_dataset(settings["data"], data_dir, progress=progress))
        if self.dataset is None:  # the other ranks read rank 0's cache
            self.dataset = generate_dataset(settings["data"], data_dir, progress=False)
        self.data_seconds = time.perf_counter() - start
        train, test = self.dataset.split(settings["training"]["test_fraction"])
        self.train = torch.as_tensor(train, dtype=self.dtype, device=self.device)
        self.test = torch.as_tensor(test, dtype=self.dtype, device=self.device)
        self.system = alanine_dipeptide(settings["data"].solvent)
        self.temperature = settings["data"].t_min
        energy = settings["energy"]
        self.target = self.system.energy(
            self.temperature, platform_name=energy["platform"], n_workers=energy["n_workers"]
        )
        t = settings["training"]
        # default: one pass over the training data by all ranks together
        self.iters_per_epoch = t["iters_per_epoch"] or max(1, len(self.train) // (t["batch_size"] * ranks.size))
        log(
            f"data: {self.dataset.path} ({'cache' if self.dataset.from_cache else 'generated'}), "
            f"{len(self.train)} training / {len(self.test)} test frames; "
            f"{self.iters_per_epoch} iterations per epoch, device {self.device}"
            + (f", {ranks.size} ranks ({ranks.backend}), batch {t['batch_size']} per rank" if ranks.distributed else "")
        )

    def generator(self, weights: Optional[Path] = None, parallel: bool = True):
        """A fresh generator (same architecture and coordinate transform every time), with
        the flow's ``weights`` when given, and its bare flow. Under a process group and with
        ``parallel`` the generator's flow is wrapped in ``DistributedDataParallel``."""
        from .systems.generators import spline_generator

        m = self.settings["model"]
        gen = spline_generator(
            self.system, self.train.cpu(), self.target, n_torsion_layers=m["n_torsion_layers"],
            n_rest_layers=m["n_rest_layers"], hidden=m["hidden"], n_bins=m["n_bins"],
        ).to(self.device)
        flow = gen.flow
        if weights is not None:
            flow.load_state_dict(torch.load(weights, map_location=self.device))
        if parallel and self.ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            gen = bg.BoltzmannGenerator(
                gen.prior, DistributedDataParallel(flow, device_ids=ids, process_group=self.ranks.group), gen._target
            )
        return gen, flow

    def close(self) -> None:
        self.target.close()


def _epoch_progress(trainer: ProgressiveKLTrainer, stage: str, n_epochs: int, log: Callable[[str], None]):
    """A ``progress_bar`` for ``train()`` that logs one line per finished epoch, with the time left."""

    def bar(iterations):
        start, first = time.perf_counter(), len(trainer.history)
        ipe = trainer.iters_per_epoch

        def report():
            done = len(trainer.history) - first
            if done <= 0:
                return
            left = (time.perf_counter() - start) / done * (n_epochs - len(trainer.history))
            log(f"[{stage}] {trainer.summary_line(trainer.history[-1])}  (~{left:.0f} s left)")

        for i in iterations:
            if i > 0 and i % ipe == 0:
                report()
            yield i
        report()

    return bar


def _train_stage(stage: str, ctx: _RunContext, run: RunDirectory, log: Callable[[str], None]) -> dict[str, Any]:
    settings, t = ctx.settings, ctx.settings["training"]
    n_epochs = t["nll_epochs"] if stage == "nll" else t["mixed_epochs"]
    torch.manual_seed(t["seed"] if stage == "nll" else t["seed"] + 1)
    gen, flow = ctx.generator(None if stage == "nll" else run.model("nll"))
    optim = torch.optim.Adam(gen.parameters(), lr=t["lr"] if stage == "nll" else t["mixed_lr"])
    common = dict(
        iters_per_epoch=ctx.iters_per_epoch, checkpoint_every=1, checkpoint_path=run.checkpoint(stage),
        max_grad_norm=t["max_grad_norm"],
    )
    if stage in ("nll", "control"):
        trainer = ProgressiveKLTrainer(
            gen, optim, train_energy=False, lr_warmup_epochs=t["warmup_epochs"] if stage == "nll" else 0.0, **common
        )
        weights = {}
    else:
        g = settings["gate"]
        gate = dict(schedule=g["schedule"], e_cut=g["e_cut"], adaptive_quantile=g["adaptive_quantile"])
        trainer = ProgressiveKLTrainer(
            gen, optim, gate=None if settings["use_energy_gating"] else False,
            skip_policy=t["skip_policy"], min_keep_fraction=t["min_keep_fraction"], on_stall=t["on_stall"],
            **(gate if settings["use_energy_gating"] else {}), **common,
        )
        weights = dict(w_likelihood=t["w_likelihood"], w_energy=t["w_energy"], clip_forces=t["clip_forces"])
    if ctx.ranks.broadcast(run.checkpoint(stage).is_file() if ctx.ranks.is_main else None):
        trainer.resume(run.checkpoint(stage))
        log(f"[{stage}] resumed from {run.checkpoint(stage)} at epoch {len(trainer.history)}")
    remaining = n_epochs - len(trainer.history)
    if remaining > 0:
        trainer.train(
            n_epochs=remaining, data=ctx.train, batchsize=t["batch_size"],
            progress_bar=_epoch_progress(trainer, stage, n_epochs, log), **weights,
        )

    def write():
        trainer.write_history(run.history(stage))
        run.model(stage).parent.mkdir(parents=True, exist_ok=True)
        torch.save(flow.state_dict(), run.model(stage))

    ctx.ranks.on_main(write)
    history = trainer.history
    info = {
        "epochs": len(history),
        "iterations": trainer.iteration,
        "seconds": float(sum(r["seconds"] for r in history)),
        "final_nll": _finite_or_none(history[-1]["nll"]),
    }
    if stage == "mixed":
        info.update(
            batches_skipped=int(sum(r["batches_skipped"] for r in history)),
            batches=int(sum(r["batches"] for r in history)),
            final_e_max_kjmol=_finite_or_none(history[-1]["e_max"]),
            actions=[a for r in history for a in r["actions"]],
            alerts=[a for r in history for a in r["alerts"]],
        )
    return info


# -- evaluation -------------------------------------------------------------------------


def _sample(ctx: _RunContext, stage: str, run: RunDirectory, n: int, chunk: int = 2048):
    """Samples of a stage's model: coordinates, energies (kJ/mol) and log weights."""
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
            u = ctx.target.energy(x).view(-1).double()
            lw = -u + gen.prior.energy(z).view(-1).double() + dlogp.view(-1).double()
            xs.append(x.double().cpu())
            energies.append((u * kt).cpu())
            logw.append(lw.cpu())
    return torch.cat(xs), torch.cat(energies).numpy(), torch.cat(logw).numpy()


def _evaluate(ctx: _RunContext, run: RunDirectory, log: Callable[[str], None]) -> dict[str, Any]:
    from .systems.alanine import phi_psi
    from .systems.analysis import md_metrics, sample_metrics

    ev, e_cut = ctx.settings["evaluation"], ctx.settings["gate"]["e_cut"]
    kt = kt_in_kjmol(ctx.temperature)
    test = ctx.test.double().cpu()
    arrays: dict[str, np.ndarray] = {}
    phi, psi = (a.numpy() for a in phi_psi(test))
    test_energies = ctx.dataset.energies[-len(test):]
    arrays.update(md_phi=phi, md_psi=psi, md_energy=test_energies)
    metrics = {"md": md_metrics(phi, psi, kt)}
    for stage in TRAINING_STAGES:
        x, energy, logw = _sample(ctx, stage, run, ev["n_samples"])
        metrics[stage] = sample_metrics(x, energy, logw, test, kt=kt, e_cut=e_cut, bins=ev["bins"])
        sphi, spsi = (a.numpy() for a in phi_psi(x))
        arrays.update({f"{stage}_phi": sphi, f"{stage}_psi": spsi, f"{stage}_energy": energy, f"{stage}_logw": logw})
        m = metrics[stage]
        log(
            f"[evaluation] {stage}: {100 * m['below_e_cut']:.1f} % below E_cut, phi/psi KL {m['phi_psi_kl']:.3f}, "
            f"ESS {m['ess_percent']:.3g} %, median energy {m['energy_median_kjmol']:.4g} kJ/mol"
        )
    np.savez_compressed(run.evaluation, **arrays)
    return metrics


def _comparison(metrics: dict[str, Any]) -> dict[str, Any]:
    """The mixed model against the NLL-only control: it helps when it has more samples below
    E_cut and a larger ESS, with a phi/psi KL no worse than the control's beyond the noise of
    resampling (0.1). The fraction's gain comes with its standard error."""
    mixed, control = metrics["mixed"], metrics["control"]
    kl_noise = 0.1
    # standard error of the difference of two fractions from independent samples
    se = math.sqrt(sum(m["below_e_cut"] * (1 - m["below_e_cut"]) / m["samples"] for m in (mixed, control)))
    out = {
        "below_e_cut_gain": mixed["below_e_cut"] - control["below_e_cut"],
        "below_e_cut_gain_standard_error": se,
        "ess_percent_gain": mixed["ess_percent"] - control["ess_percent"],
        "phi_psi_kl_change": mixed["phi_psi_kl"] - control["phi_psi_kl"],
        "kl_noise_level": kl_noise,
    }
    out["below_e_cut_gain_significant"] = bool(out["below_e_cut_gain"] > 2 * se)
    out["mixed_helps"] = bool(
        out["below_e_cut_gain"] > 0 and out["ess_percent_gain"] > 0 and out["phi_psi_kl_change"] <= kl_noise
    )
    return out


def _targets(metrics: dict[str, Any]) -> dict[str, Any]:
    m = metrics["mixed"]
    basins = m["basins"]
    return {
        "below_e_cut_at_least_95_percent": bool(m["below_e_cut"] >= 0.95),
        "both_phi_negative_basins_populated": bool(basins["C5/beta"] > 0 and basins["C7eq/alphaR"] > 0),
        "phi_psi_kl_below_0.5": bool(m["phi_psi_kl"] < 0.5),
    }


# -- the whole run --------------------------------------------------------------------


def train_experiment(
    settings: dict[str, Any],
    out_dir: Union[str, Path],
    *,
    data_dir: Union[str, Path] = "data",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    ranks: Optional[Ranks] = None,
) -> Optional[dict[str, Any]]:
    """Run (or, with ``resume``, continue) an experiment; returns the summary.

    Under a process group every rank calls it; rank 0 returns the summary, the others
    return ``None`` once the training stages are done (rank 0 evaluates alone).

    Parameters
    ----------
    settings : dict
        From :func:`bgflow_gate.config.run_settings`.
    out_dir : str or Path
        The run directory (created; must be empty unless ``resume``).
    data_dir : str or Path
        The data cache (see :func:`~bgflow_gate.systems.data.generate_dataset`).
    resume : bool
        Continue the run in ``out_dir`` from its last checkpoint.
    progress : bool
        Show the replica exchange's progress line.
    log : callable
        Receives one line per epoch and per stage.
    ranks : Ranks, optional
        The process group (default: the initialised default group, else one process).
    """
    from .report import draw_plots

    ranks = ranks if ranks is not None else Ranks.default()
    run = RunDirectory(out_dir)
    ranks.on_main(lambda: _prepare(run, settings, resume))
    ctx = _RunContext(settings, data_dir, log, progress, ranks)
    try:
        # rank 0's view of the run decides for every rank (rank 0 writes progress.json)
        done = ranks.broadcast(run.read_progress() if ranks.is_main else None)
        if "data" not in done:
            ranks.on_main(lambda: run.mark_done(
                "data", seconds=ctx.data_seconds, cached=ctx.dataset.from_cache, path=str(ctx.dataset.path)
            ))
        for stage in TRAINING_STAGES:
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
    progress_info = run.read_progress()
    summary = {
        "experiment": settings["name"],
        "version": __version__,
        "host": bg.HOST,
        "torch": torch.__version__,
        "device": settings["device"],
        "use_energy_gating": settings["use_energy_gating"],
        "e_cut_kjmol": settings["gate"]["e_cut"],
        "temperature_k": ctx.temperature,
        "data": {
            "path": str(ctx.dataset.path), "train_frames": len(ctx.train), "test_frames": len(ctx.test),
            "generated_seconds": _finite_or_none(ctx.dataset.seconds),
        },
        "stages": progress_info,
        "wall_seconds": {k: v.get("seconds") for k, v in progress_info.items()},
        "metrics": metrics,
        "mixed_vs_control": _comparison(metrics),
        "targets": _targets(metrics),
    }
    run.write_json(run.summary, summary)
    draw_plots(run.root)
    log(f"summary: {run.summary}; plots: {run.plots}")
    return summary
