"""``ProgressiveKLTrainer``: bgflow's ``KLTrainer`` with epochs and progressive gating.

The loop lives here; each concept it uses has its own module: one iteration
(:mod:`.step`, :mod:`.gradients`), what gated samples do (:mod:`.policies`), the epoch record
(:mod:`.ledger`), the health monitor (:mod:`.monitor`), LR warm-up (:mod:`.warmup`),
checkpoints (:mod:`.checkpoint`) and the data batches (:mod:`.batches`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .. import bg
from ..distributed import Ranks, synchronise
from ..gate import ScheduledEnergyGate, gate_for
from ..schedules import Schedule
from ..targets import generator_target
from ..validation import check_number
from .batches import DataSlots
from .checkpoint import Resumable, restore_rng
from .ledger import EpochLedger, TensorBoardLog, summary_line, write_history
from .lr import LinearWarmup, step_epoch_schedulers, step_iteration_schedulers
from .monitor import HealthMonitor, StallRemedy
from .policies import skip_policy as make_skip_policy
from .step import KLStep, StepSettings, held_out_nll

__all__ = ["ProgressiveKLTrainer"]

EpochCallback = Callable[["ProgressiveKLTrainer", dict], Any]


class ProgressiveKLTrainer(Resumable, bg.KLTrainer):
    """bgflow's ``KLTrainer`` with an epoch-scheduled energy gate.

    The generator is never changed: the trainer keeps the gate (``trainer.gate``, whose
    ``target`` is the generator's own target) and evaluates the KL term through it.

    Parameters
    ----------
    bg, optim, train_likelihood, train_energy, custom_loss, test_likelihood
        As in bgflow's ``KLTrainer``.
    gate : ScheduledEnergyGate or False, optional
        The gate; it must wrap the generator's target. Default: the generator's target if
        it is a gate already, otherwise :meth:`ScheduledEnergyGate.for_generator` with the
        arguments below. ``False``: no gate, the KL term sees the raw target (as bgflow's).
    schedule, e_cut, target_unit, temperature, adaptive_quantile, above_cut
        Passed to a new gate (see :class:`ScheduledEnergyGate`). The unit is read from an
        OpenMM target; any other target needs ``target_unit`` (an error says so).
    iters_per_epoch : int, optional
        Iterations per epoch. Default: one pass over ``data`` by all ranks together
        (``len(data) // (batchsize * ranks)``); required when there is no data of known length.
    skip_policy : {"drop", "batch", "step", "clamp"}
        What gated samples do to the KL term (see :data:`~bgflow_gate.SKIP_POLICIES`).
    min_keep_fraction : float
        ``"drop"``: the KL term is skipped when fewer than this fraction of the batch is
        left after dropping (0.5).
    max_grad_norm : float, optional
        Clip the total gradient norm of every step to this value.
    monitor : HealthMonitor or dict or None
        The health monitor (a dict is passed to :class:`HealthMonitor`); default one.
    on_stall : {"warn", "relax"}
        ``"relax"``: when the monitor finds a stall (every KL batch skipped for
        ``stall_epochs``, or the skip rate above the stage's expected level for
        ``skip_window`` epochs), multiply E_max by ``relax_factor``, record the action and
        carry on; the check is re-armed, so a run still stalled relaxes again.
    relax_factor : float
        (10).
    lr_warmup_epochs : float
        Linear learning-rate warm-up from ~0 over this many epochs (0: none); multiplies
        whatever the schedulers set.
    checkpoint_every, checkpoint_path : int, str or Path, optional
        Write a checkpoint to ``checkpoint_path`` every this many epochs (atomically).
    log_dir : str or Path, optional
        TensorBoard scalars of every epoch record (needs ``tensorboard``; rank 0 only).
    process_group : torch.distributed.ProcessGroup or False, optional
        Data-parallel training (see :mod:`bgflow_gate.distributed`). Default: the group of
        a ``DistributedDataParallel`` wrapper inside ``bg``, else the default group when
        ``torch.distributed`` is initialised, else none. ``False``: every process trains
        on its own. Under a group each rank draws ``batchsize`` samples (and a disjoint
        shard of tensor data), one collective per iteration sums the gradients and the
        counts behind every skip decision, the gate's statistics and the history describe
        all ranks together, rank 0 writes checkpoints and logs.

    Attributes
    ----------
    gate : ScheduledEnergyGate or None
    policy : SkipPolicy
    ranks : bgflow_gate.distributed.Ranks
    epoch : float
        Epochs trained so far (``iteration / iters_per_epoch``).
    iteration : int
        Iterations trained so far, over all ``train()`` calls.
    history : list of dict
        One record per finished epoch (the fields of
        :class:`~bgflow_gate.training.EpochRecord`).
    """

    def __init__(self, bg, optim: torch.optim.Optimizer | None = None, train_likelihood: bool = True,
                 train_energy: bool = True, custom_loss: Callable | None = None, test_likelihood: bool = False,
                 *, gate: ScheduledEnergyGate | bool | None = None, schedule: Schedule | dict | None = None,
                 e_cut: float = 500.0, target_unit: str | None = None, temperature: float | None = None,
                 adaptive_quantile: float | None = None, above_cut: str = "energy",
                 iters_per_epoch: int | None = None, skip_policy: str = "drop", min_keep_fraction: float = 0.5,
                 max_grad_norm: float | None = None, monitor: HealthMonitor | dict | None = None,
                 on_stall: str = "warn", relax_factor: float = 10.0, lr_warmup_epochs: float = 0.0,
                 checkpoint_every: int | None = None, checkpoint_path: str | Path | None = None,
                 log_dir: str | Path | None = None, process_group=None):
        super().__init__(bg, optim=optim, train_likelihood=train_likelihood, train_energy=train_energy,
                         custom_loss=custom_loss, test_likelihood=test_likelihood)
        if iters_per_epoch is not None and (not isinstance(iters_per_epoch, int) or iters_per_epoch < 1):
            raise ValueError(f"iters_per_epoch must be a positive whole number, got {iters_per_epoch!r}")
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        self.policy = make_skip_policy(skip_policy, min_keep_fraction)
        self.max_grad_norm = None if max_grad_norm is None else check_number(
            max_grad_norm, "max_grad_norm", "norm", lower=0, strict=True)
        self.monitor = monitor if isinstance(monitor, HealthMonitor) else HealthMonitor(**(monitor or {}))
        self.remedy = StallRemedy(self.monitor, on_stall, relax_factor)
        self.warmup = LinearWarmup(lr_warmup_epochs)
        self.iters_per_epoch, self.checkpoint_every = iters_per_epoch, checkpoint_every
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.gate = gate_for(self.bg, gate, self.train_energy, dict(
            schedule=schedule, e_cut=e_cut, target_unit=target_unit, temperature=temperature,
            adaptive_quantile=adaptive_quantile, above_cut=above_cut))
        self.reporter = type(self.reporter)(*self._labels())  # the parent's reporter type, with every label
        self.iteration, self.history, self.ledger = 0, [], EpochLedger()
        self.ranks = Ranks.resolve(process_group, self.bg)
        self.data = DataSlots(self.ranks)
        self.kl_step = KLStep(self.bg, self.gate if self.gate is not None else generator_target(self.bg), self.gate,
                              self.policy, self.ranks, self.max_grad_norm)
        self._pending_rng: dict | None = None  # from a checkpoint, restored when training continues
        self._synchronised = False  # parameters broadcast and rank streams set (distributed)
        self.log = TensorBoardLog(log_dir) if log_dir is not None and self.ranks.is_main else None

    # -- set-up ------------------------------------------------------------------------

    def _labels(self) -> list[str]:
        """The reporter's loss labels, one per value reported each iteration."""
        flags = (self.train_energy, self.train_likelihood, self.test_likelihood, self.custom_loss is not None)
        return [label for label, on in zip(("KLL", "NLL", "NLL(Test)", "Custom"), flags) if on]

    # -- epochs ------------------------------------------------------------------------

    @property
    def epoch(self) -> float:
        """Epochs trained so far (fractional within an epoch)."""
        return self.iteration / self.iters_per_epoch if self.iters_per_epoch else 0.0

    def _resolve_iters_per_epoch(self, data, batchsize: int) -> int:
        """Default: one pass over ``data`` by all ranks together."""
        if self.iters_per_epoch is None:
            if not hasattr(data, "__len__"):
                raise ValueError("iters_per_epoch is needed: there is no training data of known length to define "
                                 "an epoch; pass iters_per_epoch=<iterations> to ProgressiveKLTrainer")
            self.iters_per_epoch = max(1, len(data) // (batchsize * self.ranks.size))
        return self.iters_per_epoch

    # -- training ----------------------------------------------------------------------

    def train(self, n_iter: int | None = None, data=None, testdata=None, batchsize: int = 128,
              w_likelihood: float | None = None, w_energy: float | None = None, w_custom: float | None = None,
              custom_loss_kwargs: dict = {}, n_print: int = 0, temperature: float = 1.0,
              schedulers: Iterable = (), clip_forces: float | None = None,
              progress_bar: Callable = lambda x: x, *, n_epochs: float | None = None,
              epoch_schedulers: Sequence = (), on_epoch_end: EpochCallback | Sequence[EpochCallback] = ()
              ) -> list[dict]:
        """Train for ``n_iter`` iterations or ``n_epochs`` epochs; returns the history.

        Parameters
        ----------
        n_iter, data, testdata, batchsize, w_likelihood, w_energy, w_custom,
        custom_loss_kwargs, temperature, progress_bar
            As in bgflow's ``KLTrainer.train``.
        schedulers : iterable of (int, scheduler)
            Stepped after the optimiser step of every ``interval``-th iteration, counted over
            the whole run (bgflow steps them before it, which loses the first rate).
        n_print : int
            Print the losses every ``n_print`` iterations (as bgflow) and, when positive,
            a one-line summary at the end of every epoch.
        clip_forces : float, optional
            Clamp every component of the target's force on the generated samples,
            ``-dE/dx``, to ``[-clip_forces, clip_forces]`` before it reaches the flow.
            bgflow ignores this argument.
        n_epochs : float, optional
            Train this many epochs instead of ``n_iter`` iterations.
        epoch_schedulers : sequence
            Learning-rate schedulers stepped once at the end of every epoch.
        on_epoch_end : callable or sequence of callables
            Called as ``fn(trainer, record)`` after every finished epoch; training stops
            there when one returns ``False`` (e.g. :class:`~bgflow_gate.training.EarlyStopping`).
        """
        if (n_iter is None) == (n_epochs is None):
            raise ValueError("give exactly one of n_iter and n_epochs")
        settings = StepSettings.of_train(
            self, data, batchsize, w_likelihood, w_energy, w_custom, custom_loss_kwargs, temperature, clip_forces)
        sampler, test_sampler = self._prepare(data, testdata)
        ipe = self._resolve_iters_per_epoch(data, batchsize)
        if n_epochs is not None:
            n_iter = int(round(check_number(n_epochs, "n_epochs", "number of epochs", lower=0) * ipe))
        callbacks = [on_epoch_end] if callable(on_epoch_end) else list(on_epoch_end)
        bar = progress_bar(range(n_iter))
        for _ in bar:
            self._iterate(settings, sampler, test_sampler, ipe, schedulers, n_print)
            if self.iteration % ipe == 0:
                record = self._end_epoch(ipe, epoch_schedulers)
                self._announce(record, bar, n_print)
                if False in [callback(self, record) for callback in callbacks]:
                    break
        return self.history

    def _prepare(self, data, testdata):
        """Before the first iteration of a ``train()`` call: ranks in step, the samplers,
        and the random state a checkpoint brought."""
        sampler, test_sampler = self.data.sampler(data, "data"), self.data.sampler(testdata, "test")
        if not self._synchronised:
            synchronise(self.ranks, self.bg, self.kl_step.ddp, seed=self._pending_rng is None)
            self._synchronised = True
        rng, self._pending_rng = self._pending_rng, None
        if rng is not None:  # after the samplers: building one draws a shuffle order
            restore_rng(rng)
        return sampler, test_sampler

    def _iterate(self, settings: StepSettings, sampler, test_sampler, ipe: int, schedulers, n_print: int) -> None:
        it = self.iteration
        if self.gate is not None:
            self.gate.set_epoch(it / ipe)
        outcome = self.kl_step.run(self.optim, sampler, settings, it)
        if outcome.stepped:
            self.warmup.step(self.optim, self.warmup.factor(it, ipe))
        step_iteration_schedulers(schedulers, it)
        self.ledger.add(outcome)
        reports = self._reports(outcome, test_sampler, settings)
        self.reporter.report(*[np.asarray(r) for r in reports])  # bgflow's reporter takes arrays
        if n_print > 0 and it % n_print == 0 and self.ranks.is_main:
            self.reporter.print(*reports)
        self.iteration += 1

    def _reports(self, outcome, test_sampler, settings: StepSettings) -> list[float]:
        """The iteration's losses in the reporter's order (a skipped KL term is nan, never 0)."""
        reports = [outcome.kll] if self.train_energy else []
        reports += [outcome.numbers.nll] if self.train_likelihood else []
        if self.test_likelihood:
            reports.append(held_out_nll(self.bg, test_sampler, settings))
        if self.custom_loss is not None:
            reports.append(outcome.numbers.custom if settings.w_custom is not None else math.nan)
        return reports

    @property
    def samplers(self) -> dict[str, Any]:
        """The samplers training draws from, by slot (``"data"``, ``"test"``): this rank's
        :class:`~bgflow_gate.training.TensorBatches` for tensor data, else the user's sampler."""
        return self.data.samplers()

    # -- the end of an epoch -------------------------------------------------------------

    def _end_epoch(self, ipe: int, epoch_schedulers: Sequence) -> dict:
        epoch = self.iteration // ipe - 1  # the epoch just finished
        stats = {}
        if self.gate is not None:
            self.gate.all_reduce_statistics(self.ranks)  # the ledger's counts are global already
            stats = self.gate.statistics("epoch")
        lr = self.optim.param_groups[0]["lr"] * self.warmup.factor(self.iteration - 1, ipe)
        record = self.ledger.close(epoch, stats, lr).as_dict()
        self.history.append(record)
        self.remedy.apply(self.history, self.gate, speak=self.ranks.is_main)  # every rank decides alike
        step_epoch_schedulers(epoch_schedulers, record)
        if self.log is not None:
            self.log.add(record)
        self.ledger = EpochLedger()
        if self.checkpoint_every and (epoch + 1) % self.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint_path)
        return record

    def _announce(self, record: dict, bar, n_print: int) -> None:
        if n_print > 0 and self.ranks.is_main:
            print(self.summary_line(record))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(epoch=record["epoch"], loss=record["kll"] if self.train_energy else record["nll"],
                            e_max=f"{record['e_max']:.3g}", skip=f"{record['skip_rate']:.0%}")

    # -- reporting ---------------------------------------------------------------------

    summary_line = staticmethod(summary_line)  #: one line describing an epoch record

    def close(self) -> None:
        """Flush and close the TensorBoard log (if any)."""
        if self.log is not None:
            self.log.close()

    def write_history(self, path: str | Path) -> None:
        """Write the history as CSV (``.csv``) or JSON lines (``.jsonl``)."""
        write_history(self.history, path)
