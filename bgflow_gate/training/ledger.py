"""The epoch record: the history's schema, its accumulator, and writing it out.

:class:`EpochRecord` declares the history once: its fields *are* the keys of every record
in :attr:`ProgressiveKLTrainer.history <bgflow_gate.ProgressiveKLTrainer.history>`
(:data:`HISTORY_KEYS`). :class:`EpochLedger` adds up one epoch's iterations and closes them
into a record.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from .step import StepOutcome

__all__ = ["EpochRecord", "EpochLedger", "HISTORY_KEYS", "write_history", "summary_line", "TensorBoardLog"]


@dataclasses.dataclass
class EpochRecord:
    """One finished epoch. Energies in kJ/mol; ``nan`` where a value does not exist
    (no gate, no KL batch applied, no NLL step)."""

    epoch: int  #: the epoch's number, from 0
    e_max: float  #: the effective E_max at the epoch's end
    scheduled_e_max: float  #: what the schedule alone gives there
    batches: int  #: KL batches drawn (one per iteration, all ranks together)
    batches_skipped: int  #: KL batches whose term did not apply
    skip_rate: float  #: batches_skipped / batches
    steps_skipped: int  #: optimisation steps not taken
    nonfinite_steps: int  #: steps with a non-finite total gradient
    kl_nonfinite: int  #: KL terms the policy kept whose gradient was not finite
    samples: int  #: KL samples the gate saw
    samples_gated: int  #: of them gated (above E_max, non-finite, target error)
    samples_above_cut: int  #: of them between E_cut and E_max (treated as the gate's ``above_cut`` says)
    nonfinite: int  #: of them with a non-finite energy or coordinates
    energy_p50: float  #: median raw energy
    energy_p90: float  #: 90th percentile of the raw energy
    energy_max: float  #: largest raw energy
    kll: float  #: mean KL loss over the batches it applied to
    nll: float  #: mean NLL over the steps taken
    logdet_mean: float  #: mean log|det J| of the KL samples
    logdet_std: float  #: its standard deviation
    lr: float  #: learning rate of the epoch's last step (warm-up included)
    seconds: float  #: wall time of the epoch
    alerts: list = dataclasses.field(default_factory=list)  #: the health monitor's messages
    actions: list = dataclasses.field(default_factory=list)  #: what the stall remedy did

    def as_dict(self) -> dict[str, Any]:
        """The record as the plain dict the history holds."""
        return dataclasses.asdict(self)


#: The keys of every history record, in order.
HISTORY_KEYS = tuple(f.name for f in dataclasses.fields(EpochRecord))


class EpochLedger:
    """Adds up the iterations of the current epoch (host numbers, one outcome per iteration)."""

    _COUNTERS = (
        "batches", "batches_skipped", "steps", "steps_skipped", "nonfinite_steps", "kl_nonfinite",
        "above_cut", "kll_sum", "kll_n", "nll_sum", "nll_n", "logdet_sum", "logdet_sq", "logdet_n",
    )

    def __init__(self) -> None:
        self.start = time.perf_counter()
        for name in self._COUNTERS:
            setattr(self, name, 0)

    def add(self, outcome: StepOutcome) -> None:
        """Count one iteration."""
        self.steps += 1
        self.steps_skipped += not outcome.stepped
        self.nonfinite_steps += not outcome.grads_finite
        if outcome.kl_drawn:
            n = outcome.numbers
            self.batches += 1
            self.batches_skipped += not outcome.kl_applied
            self.kl_nonfinite += outcome.kl_nonfinite
            self.above_cut += int(n.above_cut)
            self.logdet_sum += n.logdet_sum
            self.logdet_sq += n.logdet_sq
            self.logdet_n += outcome.n_samples
            if outcome.kl_applied:
                self.kll_sum += outcome.kll
                self.kll_n += 1
        if outcome.nll_trained:
            self.nll_sum += outcome.numbers.nll
            self.nll_n += 1

    def close(self, epoch: int, gate_stats: dict[str, Any], lr: float) -> EpochRecord:
        """The epoch's record, from these counts and the gate's epoch statistics (``{}`` without a gate)."""
        n = self.logdet_n
        ld_mean = self.logdet_sum / n if n else math.nan
        get = gate_stats.get
        return EpochRecord(
            epoch=epoch, e_max=get("e_max", math.nan), scheduled_e_max=get("scheduled_e_max", math.nan),
            batches=self.batches, batches_skipped=self.batches_skipped,
            skip_rate=self.batches_skipped / self.batches if self.batches else 0.0,
            steps_skipped=self.steps_skipped, nonfinite_steps=self.nonfinite_steps,
            kl_nonfinite=self.kl_nonfinite, samples=get("samples", 0), samples_gated=get("gated", 0),
            samples_above_cut=self.above_cut, nonfinite=get("nonfinite", 0),
            energy_p50=get("energy_p50", math.nan), energy_p90=get("energy_p90", math.nan),
            energy_max=get("energy_max", math.nan),
            kll=self.kll_sum / self.kll_n if self.kll_n else math.nan,
            nll=self.nll_sum / self.nll_n if self.nll_n else math.nan,
            logdet_mean=ld_mean,
            logdet_std=math.sqrt(max(self.logdet_sq / n - ld_mean**2, 0.0)) if n else math.nan,
            lr=lr, seconds=time.perf_counter() - self.start,
        )

    def state_dict(self) -> dict[str, float]:
        """The counters (a checkpoint may be taken mid-epoch)."""
        return {name: getattr(self, name) for name in self._COUNTERS}

    def load_state_dict(self, state: dict[str, float]) -> None:
        unknown = set(state) - set(self._COUNTERS)
        if unknown:
            raise ValueError(f"unknown epoch counter(s) in the checkpoint: {', '.join(sorted(unknown))}")
        for name, value in state.items():
            setattr(self, name, value)


def write_history(history: list[dict], path: str | Path) -> None:
    """Write epoch records as CSV (``.csv``) or JSON lines (any other suffix, e.g. ``.jsonl``).

    List-valued fields (alerts, actions) are joined with ``"; "`` in CSV; JSON has no NaN
    or infinity, so they are written as ``null``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".csv":
        with path.open("w") as fh:
            for record in history:
                fh.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        return
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k not in keys]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for record in history:
            writer.writerow({k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in record.items()})


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def summary_line(record: dict) -> str:
    """One line describing an epoch record (without the gate's fields when there is no gate)."""
    gate = (
        f"  E_max {record['e_max']:.3g} kJ/mol"
        f"  KL skipped {record['batches_skipped']}/{record['batches']} ({record['skip_rate']:.0%})"
        f"  gated {record['samples_gated']}/{record['samples']}"
    ) if not math.isnan(record["e_max"]) else ""
    kll = f"  KLL {record['kll']:.4g}" if not math.isnan(record["kll"]) else ""
    p50 = f"  E_p50 {record['energy_p50']:.3g}" if not math.isnan(record["energy_p50"]) else ""
    return (
        f"epoch {record['epoch']:>4}{gate}{kll}  NLL {record['nll']:.4g}{p50}  lr {record['lr']:.3g}"
        + ("  ! " + " | ".join(record["alerts"]) if record["alerts"] else "")
    )


class TensorBoardLog:
    """Epoch records as TensorBoard scalars in ``log_dir`` (a warning, and nothing written,
    without the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("log_dir needs the tensorboard package; TensorBoard logging is off", RuntimeWarning)
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir))

    def add(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, record["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
