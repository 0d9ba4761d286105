"""The ``bgflow-gate`` command.

Sub-commands
------------
schedule
    Print an E_max schedule as a table: the default, an experiment's from the
    experiments file, or one given by options.
data
    Generate (or load from the cache) an experiment's alanine dipeptide training data by
    replica exchange, and check it; write the system snapshot beside it (what a run on a
    machine without OpenMM reads).
check-data
    Check a dataset file: finite coordinates, energies against the force field, basins,
    statistical inefficiency.
train
    Train a Boltzmann generator for alanine dipeptide end to end (data, then the stages of
    the experiment's route: NLL stage, mixed stage with the gate and its NLL-only control;
    or gated reverse KL alone from the physically initialised flow; evaluation, plots);
    ``--resume`` continues a killed run.
report
    Re-draw the plots of a finished run and print its metrics.

Exit status: 0 done; 1 a check failed (``data``, ``check-data``) or another rank stopped;
2 bad input, with one line that names the file or setting and what to do.

Environment: ``BGFLOW_GATE_DATA_DIR`` (the data cache, see
:func:`~bgflow_gate.systems.data.default_data_dir`), ``OMP_NUM_THREADS`` (threads, unless
``--threads`` is given).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from . import __version__
from .config import DEFAULT_CONFIG, ConfigError, data_settings, experiment_schedule, load_experiments
from .distributed import RankFailure
from .schedules import SCHEDULE_TYPES, schedule_from_dict
from .units import kt_in_kjmol

__all__ = ["main", "build_parser"]

# option name -> schedule argument
_SCHEDULE_OPTIONS = {
    "e_initial": "--e-initial",
    "e_final": "--e-final",
    "hold_epochs": "--hold-epochs",
    "warmup_epochs": "--warmup-epochs",
    "epochs": "--epochs",
    "value": "--value",
}


class ChecksFailed(Exception):
    """A command ran, but what it checked has problems: its report is printed and the exit
    status is 1."""


def _epoch_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs such as 0,50,175,300; got {text!r}"
        ) from None


def _thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}")
    return int(text)


def _experiment_options(parser: argparse.ArgumentParser, quiet: str) -> None:
    """The options of the commands that run an experiment: which one, where its data are
    cached, how many threads, how much output."""
    parser.add_argument("--experiment", required=True, help="experiment name in the experiments file")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="experiments file (default: the one shipped with the package)")
    parser.add_argument("--data-dir", help="data cache directory (default: $BGFLOW_GATE_DATA_DIR, else the "
                                           "per-user cache, e.g. ~/.cache/bgflow-gate/data)")
    parser.add_argument("--threads", type=_thread_count,
                        help="CPU threads for torch and OpenMM (default: $OMP_NUM_THREADS, else every core); "
                             "on a shared node, the cores you were given")
    parser.add_argument("--quiet", action="store_true", help=quiet)


def _add_schedule(sub) -> None:
    sched = sub.add_parser(
        "schedule", help="print an E_max schedule as a table",
        description=(
            "Print an E_max schedule: its stages and E_max (kJ/mol) at chosen epochs. "
            "Without options: the default three-stage schedule. Options override the "
            "values of the experiment's (or the default) schedule."
        ),
    )
    sched.add_argument("--experiment", help="take the schedule of this experiment (or schedule preset)")
    sched.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="experiments file for --experiment (default: the one shipped with the package)")
    sched.add_argument("--type", choices=sorted(SCHEDULE_TYPES), help="schedule type (default: three_stage)")
    sched.add_argument("--e-initial", type=float, help="E_max at the start, kJ/mol")
    sched.add_argument("--e-final", type=float, help="E_max at the end, kJ/mol")
    sched.add_argument("--hold-epochs", type=float, help="three_stage: end of stage 1")
    sched.add_argument("--warmup-epochs", type=float, help="three_stage: end of stage 2")
    sched.add_argument("--epochs", type=float, help="linear: length of the descent")
    sched.add_argument("--value", type=float, help="constant: E_max, kJ/mol")
    sched.add_argument("--at", type=_epoch_list,
                       help="epochs to tabulate, comma-separated (default: stage boundaries and 25/50/75 %%)")
    sched.add_argument("--temperature", type=float, help="also show E_max in kT at this temperature (K)")
    sched.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sched.set_defaults(func=_cmd_schedule)


def _add_data(sub) -> None:
    data = sub.add_parser(
        "data", help="generate an experiment's training data (replica exchange), or load it from the cache",
        description=(
            "Run the replica exchange of the experiment's data section (alanine dipeptide, OpenMM), "
            "keep the coldest replica's frames, store them in the cache and check them. A second "
            "call with the same settings loads the cached file. Exit status 1 when a check fails."
        ),
    )
    _experiment_options(data, quiet="no progress line")
    data.set_defaults(func=_cmd_data)
    check = sub.add_parser("check-data", help="check a dataset file",
                           description="Check a dataset file; exit status 1 when a check fails.")
    check.add_argument("path", help="a .npz file written by 'bgflow-gate data'")
    check.set_defaults(func=_cmd_check_data)


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train", help="train a Boltzmann generator for alanine dipeptide end to end",
        description=(
            "Data (replica exchange, cached, checked) -> the experiment's route: the generator of model.kind "
            "(spline or physical) -> NLL stage -> mixed NLL+KL stage with the energy gate, beside an NLL-only control of "
            "equal length (training.route nll_then_mixed); or the physically initialised generator trained by "
            "gated reverse KL alone, no MD data (kl_only) -> evaluation against the MD test frames -> "
            "summary.json and plots in the run directory."
        ),
    )
    _experiment_options(train, quiet="no progress line, no per-epoch lines")
    train.add_argument("--device", choices=("cpu", "cuda", "auto"),
                       help="where the flow trains (default: the experiment's device)")
    train.add_argument("--out", help="run directory (default: runs/EXPERIMENT)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.set_defaults(func=_cmd_train)
    report = sub.add_parser("report", help="re-draw the plots of a run and print its metrics",
                            description="Re-draw the plots of a finished 'bgflow-gate train' run.")
    report.add_argument("run_dir", help="the run directory")
    report.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The ``bgflow-gate`` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="bgflow-gate", description="Epoch-scheduled energy gating for bgflow Boltzmann generators."
    )
    parser.add_argument("--version", action="version", version=f"bgflow-gate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_schedule, _add_data, _add_train):
        add(sub)
    return parser


def _configure_threads(requested: int | None) -> int:
    """Use ``requested`` CPU threads for torch and OpenMM (default: ``$OMP_NUM_THREADS``, which
    torch reads at start-up, else torch's default); returns the number used."""
    import torch

    if requested is not None:
        torch.set_num_threads(requested)
        os.environ["OMP_NUM_THREADS"] = str(requested)  # child processes (OpenMM workers, torchrun)
    threads = torch.get_num_threads()
    os.environ.setdefault("OPENMM_CPU_THREADS", str(threads))  # OpenMM's CPU platform
    return threads


def _threads_note(threads: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{threads} thread{'s' if threads != 1 else ''} (of {cores} cores; --threads N or OMP_NUM_THREADS to change)"


def _data_dir(args: argparse.Namespace):
    from .systems.data import default_data_dir

    return args.data_dir if args.data_dir is not None else default_data_dir()


def _cmd_train(args: argparse.Namespace) -> str | None:
    from .config import run_settings
    from .distributed import Ranks, init_from_env
    from .pipeline import train_experiment
    from .report import format_summary

    settings = run_settings(load_experiments(args.config), args.experiment, source=args.config, device=args.device)
    out, data_dir = args.out or f"runs/{args.experiment}", _data_dir(args)
    threads = _configure_threads(args.threads)
    group = init_from_env(settings["device"])  # under torchrun: NCCL on GPUs, gloo on the CPU
    try:
        ranks = Ranks.default()
        quiet = args.quiet or not ranks.is_main
        log = (lambda line: None) if quiet else (lambda line: print(line, flush=True))
        log(f"bgflow-gate train {args.experiment}: run directory {out}, data cache {data_dir}, {_threads_note(threads)}")
        summary = train_experiment(settings, out, data_dir=data_dir, resume=args.resume,
                                   progress=not quiet, log=log, ranks=ranks)
    finally:
        if group is not None:
            _destroy_group()
    if summary is None:  # not rank 0
        return None
    return f"run directory: {out}\n" + format_summary(summary)


def _destroy_group() -> None:
    import gc

    import torch.distributed as dist

    # DDP wrappers sit in reference cycles that hold the group; left to the garbage
    # collector at interpreter exit, the group's teardown can abort the process
    gc.collect()
    dist.destroy_process_group()


def _cmd_report(args: argparse.Namespace) -> str:
    from .report import draw_plots, format_summary, read_summary

    try:
        paths = draw_plots(args.run_dir)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    except OSError as err:
        raise ValueError(f"cannot write the plots into {args.run_dir}/plots ({err.strerror or err}); copy the run "
                         "directory somewhere writable and run 'bgflow-gate report' on the copy") from None
    return format_summary(read_summary(args.run_dir)) + "\nplots: " + ", ".join(str(p) for p in paths)


def _cmd_data(args: argparse.Namespace) -> str:
    from .systems.analysis import format_validation, validate_dataset
    from .systems.data import generate_dataset

    settings = data_settings(load_experiments(args.config), args.experiment, source=args.config)
    threads = _configure_threads(args.threads)
    if not args.quiet:
        print(f"bgflow-gate data {args.experiment}: data cache {_data_dir(args)}, {_threads_note(threads)}",
              flush=True)
    dataset = generate_dataset(settings, _data_dir(args), progress=not args.quiet)
    origin = "loaded from the cache" if dataset.from_cache else "generated"
    snapshot = _write_snapshot(settings, _data_dir(args))
    head = f"{dataset.path} ({origin})\nsystem snapshot for runs without OpenMM: {snapshot}\n"
    return _verdict(head, validate_dataset(dataset), format_validation)


def _write_snapshot(settings, data_dir):
    """Write the system snapshot beside the data (:mod:`bgflow_gate.systems.snapshot`), so a
    machine without OpenMM can train from this cache."""
    from .systems.alanine import alanine_dipeptide
    from .systems.snapshot import SystemSnapshot, snapshot_path

    system = alanine_dipeptide(settings.solvent)
    return SystemSnapshot.of(system, settings.t_min).save(snapshot_path(data_dir, settings.solvent))


def _verdict(head: str, report: dict, formatter) -> str:
    """The formatted report; :class:`ChecksFailed` carries it when a check failed."""
    text = head + formatter(report)
    if report["problems"]:
        raise ChecksFailed(text)
    return text


def _cmd_check_data(args: argparse.Namespace) -> str:
    from .systems.analysis import format_validation, validate_dataset
    from .systems.data import load_dataset

    try:
        dataset = load_dataset(args.path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    return _verdict("", validate_dataset(dataset), format_validation)


def _cmd_schedule(args: argparse.Namespace) -> str:
    if args.experiment:
        base = experiment_schedule(args.config, args.experiment).to_dict()
    else:
        base = {"type": "three_stage"}
    if args.type and args.type != base["type"]:
        base = {"type": args.type}
    for key, option in _SCHEDULE_OPTIONS.items():
        value = getattr(args, key)
        if value is not None:
            if key not in SCHEDULE_TYPES[base["type"]]._params:
                raise ValueError(f"{option} does not apply to a {base['type']} schedule")
            base[key] = value
    schedule = schedule_from_dict(base)
    epochs = args.at if args.at is not None else schedule.default_epochs()
    if args.temperature is not None:
        kt_in_kjmol(args.temperature)  # validates
    if not args.json:
        return schedule.describe(epochs, temperature=args.temperature)
    rows = []
    for e in epochs:
        row = {"epoch": e, "stage": schedule.stage_of(e), "e_max_kjmol": schedule(e)}
        if args.temperature is not None:
            row["e_max_kt"] = schedule(e) / kt_in_kjmol(args.temperature)
        rows.append(row)
    return json.dumps({"schedule": schedule.to_dict(), "table": rows}, indent=2)


def _quiet_third_party() -> None:
    """Keep third-party noise out of the output: pymbar (imported by openmmtools) logs a
    warning about its timeseries module and a "JAX NOT FOUND" banner on import; warnings of
    this package print as one line."""
    logging.getLogger("pymbar").setLevel(logging.ERROR)

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"bgflow-gate: warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = one_line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 a check failed or another
    rank stopped, 2 bad input: the message says which file or setting and what to do)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_third_party()
    try:
        output = args.func(args)
    except ChecksFailed as failed:
        print(failed, flush=True)
        return 1
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"bgflow-gate {args.command}: error: {err}\n")
    except OSError as err:  # what no check above foresaw: still one line, naming the file
        parser.exit(2, f"bgflow-gate {args.command}: error: {err.strerror or err}: {err.filename}\n")
    except RankFailure as err:  # another rank failed and printed its error
        parser.exit(1, f"bgflow-gate {args.command}: stopped: {err}\n")
    if output is not None:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
