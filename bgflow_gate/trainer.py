"""``ProgressiveKLTrainer``: bgflow's ``KLTrainer`` with epochs and progressive gating.

A drop-in subclass of bgflow's ``KLTrainer`` (real or the host's): same constructor, same
``train()`` arguments, plus

* epochs (``iters_per_epoch``, ``train(n_epochs=...)``) that move a
  :class:`~bgflow_gate.ScheduledEnergyGate` along its E_max schedule;
* skip policies for gated samples in the KL term (``"drop"``, ``"batch"``, ``"step"``,
  ``"clamp"``) that never block the NLL step of mixed training;
* NaN / inf gradient checks, force clipping (``clip_forces``), gradient-norm clipping;
* an epoch history, a health monitor and an automatic remedy for stalls;
* LR warm-up and epoch schedulers;
* checkpoints that resume a run exactly;
* data-parallel training under ``torchrun`` / DDP with every skip decision agreed across
  ranks (:mod:`bgflow_gate.distributed`).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from . import bg
from .distributed import RankFailure, Ranks, ddp_modules, plain_state_dict, rank_seed, wrapped_state_dict
from .gate import ScheduledEnergyGate
from .host.distributions import DataSetSampler, as_tuple
from .schedules import Schedule
from .stats import EnergyStatistics, HealthMonitor, TrainingHealthWarning, write_history
from .units import parse_unit
from .validation import check_fraction, check_number

__all__ = ["ProgressiveKLTrainer", "SKIP_POLICIES", "clip_gradient"]

#: The skip policies and what they do with gated samples of a KL batch.
SKIP_POLICIES = {
    "drop": "gated samples leave the KL mean; the KL term is skipped when fewer than "
    "min_keep_fraction of the batch remain",
    "batch": "any gated sample skips the batch's KL term",
    "step": "any gated sample skips the whole optimisation step, NLL included "
    "(the original failing semantics; not recommended)",
    "clamp": "gated samples keep the gate's constant energy and their -log|det J| term "
    "(bgflow's LinLogCutEnergy behaviour)",
}


class _ClipGradient(torch.autograd.Function):
    """Identity whose backward clamps ``grad / scale`` to ``[-limit, limit]``.

    ``scale`` (a tensor in a one-element list, filled after the forward pass) is the
    factor between the gradient that arrives and the force of interest, e.g. the loss
    weight over the number of samples in a mean.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, limit: float, scale_box: list):
        ctx.limit = limit
        ctx.scale_box = scale_box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = ctx.scale_box[0] if ctx.scale_box else torch.ones((), dtype=grad.dtype, device=grad.device)
        safe = torch.where(scale != 0, scale, 1.0).to(grad.dtype)
        return (grad / safe).clamp(-ctx.limit, ctx.limit) * safe, None, None


def clip_gradient(x: torch.Tensor, limit: float, scale_box: Optional[list] = None) -> torch.Tensor:
    """Identity on ``x`` whose backward clamps each gradient component to ``[-limit, limit]``
    (after dividing by ``scale_box[0]`` when given, and multiplying back)."""
    return _ClipGradient.apply(x, limit, scale_box if scale_box is not None else [])


def _to_sampler(data):
    """A tensor becomes a ``DataSetSampler`` (bgflow's convention); samplers pass through.

    The host's ``DataSetSampler`` is used with either host: it shuffles with torch's random
    number generator and keeps its place in ``state_dict``, so checkpoints resume exactly.
    """
    return DataSetSampler(data) if isinstance(data, torch.Tensor) else data


#: The numbers of an iteration combined across ranks with the gradients (in this order):
#: a failure flag, the KL sum over the included samples, how many were included and gated,
#: the sum and square sum of the log-dets, the NLL and the custom loss.
_STEP_NUMBERS = ("failed", "kl_sum", "included", "gated", "logdet_sum", "logdet_sq", "nll", "custom")
#: The numbers that are per-rank means (averaged across ranks), not sums.
_MEANS = slice(_STEP_NUMBERS.index("nll"), None)


class _EpochAccumulator:
    """Per-epoch counters of the training loop (host numbers, read back once per iteration)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.batches = 0  # KL batches
        self.batches_skipped = 0
        self.steps = 0
        self.steps_skipped = 0
        self.nonfinite_steps = 0
        self.kl_nonfinite = 0
        self.kll_sum = 0.0
        self.kll_n = 0
        self.nll_sum = 0.0
        self.nll_n = 0
        self.logdet_sum = 0.0
        self.logdet_sq = 0.0
        self.logdet_n = 0


class ProgressiveKLTrainer(bg.KLTrainer):
    """bgflow's ``KLTrainer`` with an epoch-scheduled energy gate.

    Parameters
    ----------
    bg, optim, train_likelihood, train_energy, custom_loss, test_likelihood
        As in bgflow's ``KLTrainer``.
    gate : ScheduledEnergyGate or False, optional
        The gate. Default: the generator's target if it is a gate already, otherwise the
        target wrapped in a new gate built from the arguments below (it replaces the
        generator's target). ``False``: no gate, the KL term sees the raw target as in
        bgflow's ``KLTrainer`` (for comparisons; the trainer's other features stay).
    schedule : Schedule or dict, optional
        E_max schedule of a new gate (default :class:`ThreeStageSchedule`).
    e_cut : float
        Soft-cut start of a new gate, kJ/mol (500).
    target_unit : {"kJ/mol", "kT"}, optional
        Unit of the target's energies, for a new gate. bgflow's OpenMM energies are in kT
        and their temperature is read from the integrator; for any other target it must
        be given (an error says so).
    temperature : float, optional
        Temperature in K of a target in kT.
    adaptive_quantile : float, optional
        Passed to a new gate (see :class:`ScheduledEnergyGate`).
    iters_per_epoch : int, optional
        Iterations per epoch. Default: one pass over ``data`` (``len(data) // batchsize``);
        required when there is no data of known length.
    skip_policy : {"drop", "batch", "step", "clamp"}
        What gated samples do to the KL term (see :data:`SKIP_POLICIES`).
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
        Linear learning-rate warm-up from ~0 to the optimizer's rate over this many epochs
        (0: none); multiplies whatever the schedulers set.
    checkpoint_every : int, optional
        Write a checkpoint to ``checkpoint_path`` every this many epochs (atomically).
    checkpoint_path : str or Path, optional
        Where checkpoints go.
    log_dir : str or Path, optional
        Write the epoch history as TensorBoard scalars here (needs ``tensorboard``; rank 0 only).
    process_group : torch.distributed.ProcessGroup or False, optional
        Data-parallel training (see :mod:`bgflow_gate.distributed`). Default: the group of
        a ``DistributedDataParallel`` wrapper inside ``bg`` (e.g. ``bg.flow``), else the
        default group when ``torch.distributed`` is initialised, else none. ``False``:
        every process trains on its own. Under a group each rank draws ``batchsize``
        samples (and a disjoint shard of tensor data), one collective per iteration sums
        the gradients and the counts behind every skip decision, the gate's statistics and
        the history describe all ranks together, rank 0 writes checkpoints and logs, and
        each rank has its own reproducible random streams.

    Attributes
    ----------
    gate : ScheduledEnergyGate
    ranks : bgflow_gate.distributed.Ranks
        The ranks training together (``ranks.size == 1`` in a single process).
    epoch : float
        Epochs trained so far (``iteration / iters_per_epoch``).
    iteration : int
        Iterations trained so far, over all ``train()`` calls.
    history : list of dict
        One record per finished epoch (see :data:`bgflow_gate.stats.HISTORY_KEYS`), plus
        ``alerts`` and ``actions`` lists.
    """

    #: Monitor checks that ``on_stall="relax"`` answers by raising E_max.
    STALL_CHECKS = ("all_skipped", "skip_rate_high")

    def __init__(
        self,
        bg,
        optim: Optional[torch.optim.Optimizer] = None,
        train_likelihood: bool = True,
        train_energy: bool = True,
        custom_loss: Optional[Callable] = None,
        test_likelihood: bool = False,
        *,
        gate: Union[ScheduledEnergyGate, bool, None] = None,
        schedule: Union[Schedule, dict, None] = None,
        e_cut: float = 500.0,
        target_unit: Optional[str] = None,
        temperature: Optional[float] = None,
        adaptive_quantile: Optional[float] = None,
        iters_per_epoch: Optional[int] = None,
        skip_policy: str = "drop",
        min_keep_fraction: float = 0.5,
        max_grad_norm: Optional[float] = None,
        monitor: Union[HealthMonitor, dict, None] = None,
        on_stall: str = "warn",
        relax_factor: float = 10.0,
        lr_warmup_epochs: float = 0.0,
        checkpoint_every: Optional[int] = None,
        checkpoint_path: Union[str, Path, None] = None,
        log_dir: Union[str, Path, None] = None,
        process_group=None,
    ):
        super().__init__(
            bg,
            optim=optim,
            train_likelihood=train_likelihood,
            train_energy=train_energy,
            custom_loss=custom_loss,
            test_likelihood=test_likelihood,
        )
        if skip_policy not in SKIP_POLICIES:
            raise ValueError(f"skip_policy must be one of {', '.join(SKIP_POLICIES)}, got {skip_policy!r}")
        if on_stall not in ("warn", "relax"):
            raise ValueError(f"on_stall must be 'warn' or 'relax', got {on_stall!r}")
        if iters_per_epoch is not None and (not isinstance(iters_per_epoch, int) or iters_per_epoch < 1):
            raise ValueError(f"iters_per_epoch must be a positive whole number, got {iters_per_epoch!r}")
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        self.skip_policy = skip_policy
        self.min_keep_fraction = check_fraction(min_keep_fraction, "min_keep_fraction")
        self.max_grad_norm = (
            None if max_grad_norm is None else check_number(max_grad_norm, "max_grad_norm", "norm", lower=0, strict=True)
        )
        self.on_stall = on_stall
        self.relax_factor = check_number(relax_factor, "relax_factor", "factor", lower=1, strict=True)
        self.lr_warmup_epochs = check_number(lr_warmup_epochs, "lr_warmup_epochs", "number of epochs", lower=0)
        self.iters_per_epoch = iters_per_epoch
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.monitor = monitor if isinstance(monitor, HealthMonitor) else HealthMonitor(**(monitor or {}))
        self.gate = self._resolve_gate(gate, schedule, e_cut, target_unit, temperature, adaptive_quantile)
        self.iteration = 0
        self.history: list[dict] = []
        self._acc = _EpochAccumulator()
        self._samplers: dict[str, tuple[int, Any]] = {}  # slot -> (id(data), sampler)
        self._pending_sampler_state: dict[str, dict] = {}
        self._pending_rng: Optional[dict] = None
        self.ranks = self._ranks = Ranks.resolve(process_group, self.bg)
        self._ddp = [wrapper for _, wrapper in ddp_modules(self.bg)]  # found once: the step needs them
        self._synchronised = False  # parameters broadcast and rank streams set (distributed)
        self._writer = self._tensorboard(log_dir) if self._ranks.is_main else None

    # -- set-up ------------------------------------------------------------------------

    def _resolve_gate(self, gate, schedule, e_cut, target_unit, temperature, adaptive_quantile):
        target = getattr(self.bg, "_target", None)
        if gate is False:
            if isinstance(target, ScheduledEnergyGate):
                raise ValueError("gate=False, but the generator's target is a gate; give it the raw target")
            return None
        if isinstance(target, ScheduledEnergyGate):
            if gate is not None and gate is not target:
                raise ValueError("the generator's target is already a gate; do not pass another one")
            return target
        if gate is not None:
            if gate.target is not target:
                raise ValueError("gate must wrap the generator's target (gate.target is not bg._target)")
            self.bg._target = gate
            return gate
        if target is None or not self.train_energy:
            return None
        target_unit, temperature = self._target_unit(target, target_unit, temperature)
        gate = ScheduledEnergyGate(
            target, schedule=schedule, e_cut=e_cut, target_unit=target_unit,
            temperature=temperature, adaptive_quantile=adaptive_quantile,
        )
        self.bg._target = gate
        return gate

    @staticmethod
    def _target_unit(target, target_unit, temperature):
        """The target's unit and temperature: read from an OpenMM bridge (kT at the
        integrator's temperature; a contradicting argument is an error), otherwise as given."""
        bridge = getattr(target, "_bridge", None)
        integrator = getattr(bridge, "integrator", None) or getattr(bridge, "_integrator", None)
        if bridge is not None and integrator is not None and hasattr(integrator, "getTemperature"):
            t = integrator.getTemperature()
            t = t.value_in_unit(t.unit) if hasattr(t, "value_in_unit") else float(t)
            if target_unit is not None and parse_unit(target_unit, name="target_unit") != "kT":
                raise ValueError(
                    f"target_unit={target_unit!r} contradicts the target: OpenMM energies are in kT of "
                    f"the integrator's temperature ({t:g} K)"
                )
            if temperature is not None and abs(float(temperature) - t) > 1e-6 * t:
                raise ValueError(
                    f"temperature={temperature!r} K contradicts the target's integrator ({t:g} K), "
                    f"whose kT is the unit of its energies; leave temperature out"
                )
            return "kT", t
        if target_unit is None:
            raise ValueError(
                f"the unit of the target's energies ({type(target).__name__}) cannot be determined; "
                f"pass target_unit='kJ/mol', or target_unit='kT' with temperature=<K>, to "
                f"ProgressiveKLTrainer (or wrap the target in a ScheduledEnergyGate yourself)"
            )
        return target_unit, temperature

    @staticmethod
    def _tensorboard(log_dir):
        if log_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("log_dir needs the tensorboard package; TensorBoard logging is off", RuntimeWarning)
            return None
        return SummaryWriter(str(log_dir))

    # -- epochs ------------------------------------------------------------------------

    @property
    def epoch(self) -> float:
        """Epochs trained so far (fractional within an epoch)."""
        return self.iteration / self.iters_per_epoch if self.iters_per_epoch else 0.0

    def _resolve_iters_per_epoch(self, data, batchsize: int) -> int:
        """Default: one pass over ``data`` by all ranks together."""
        if self.iters_per_epoch is None:
            try:
                n = len(data)
            except TypeError:
                raise ValueError(
                    "iters_per_epoch is needed: there is no training data of known length to define "
                    "an epoch; pass iters_per_epoch=<iterations> to ProgressiveKLTrainer"
                ) from None
            self.iters_per_epoch = max(1, n // (batchsize * self._ranks.size))
        return self.iters_per_epoch

    # -- training ----------------------------------------------------------------------

    def train(
        self,
        n_iter: Optional[int] = None,
        data=None,
        testdata=None,
        batchsize: int = 128,
        w_likelihood: Optional[float] = None,
        w_energy: Optional[float] = None,
        w_custom: Optional[float] = None,
        custom_loss_kwargs: dict = {},
        n_print: int = 0,
        temperature: float = 1.0,
        schedulers: Iterable = (),
        clip_forces: Optional[float] = None,
        progress_bar: Callable = lambda x: x,
        *,
        n_epochs: Optional[float] = None,
        epoch_schedulers: Sequence = (),
    ) -> list[dict]:
        """Train for ``n_iter`` iterations or ``n_epochs`` epochs; returns the history.

        Parameters
        ----------
        n_iter, data, testdata, batchsize, w_likelihood, w_energy, w_custom,
        custom_loss_kwargs, temperature, schedulers, progress_bar
            As in bgflow's ``KLTrainer.train``. ``schedulers`` are stepped every
            ``interval`` iterations counted over the whole run.
        n_print : int
            Print the losses every ``n_print`` iterations (as bgflow) and, when positive,
            a one-line summary at the end of every epoch.
        clip_forces : float, optional
            Clamp every component of the target's force on the generated samples,
            ``-dE/dx``, to ``[-clip_forces, clip_forces]`` (target energy unit per
            coordinate unit) before it reaches the flow. bgflow ignores this argument.
        n_epochs : float, optional
            Train this many epochs instead of ``n_iter`` iterations.
        epoch_schedulers : sequence
            Learning-rate schedulers stepped once at the end of every epoch.
        """
        if (n_iter is None) == (n_epochs is None):
            raise ValueError("give exactly one of n_iter and n_epochs")
        w_likelihood = self.w_likelihood if w_likelihood is None else w_likelihood
        w_energy = self.w_energy if w_energy is None else w_energy
        if clip_forces is not None:
            clip_forces = check_number(clip_forces, "clip_forces", "force", lower=0, strict=True)
        if self.train_likelihood and data is None:
            raise ValueError("likelihood training needs data; pass data= to train()")
        if w_custom is not None and self.custom_loss is None:
            raise ValueError("w_custom needs a custom_loss, given to the constructor")
        self._synchronise()
        sampler = self._sampler(data, "data")
        test_sampler = self._sampler(testdata, "test")
        self._restore_rng()
        ipe = self._resolve_iters_per_epoch(data, batchsize)
        if n_epochs is not None:
            n_epochs = check_number(n_epochs, "n_epochs", "number of epochs", lower=0)
            n_iter = int(round(n_epochs * ipe))
        total_w = w_likelihood + w_energy
        if total_w <= 0 and w_custom is None:
            raise ValueError("w_likelihood + w_energy must be positive")

        bar = progress_bar(range(n_iter))
        for _ in bar:
            it = self.iteration
            if self.gate is not None:
                self.gate.set_epoch(it / ipe)
            for interval, scheduler in schedulers:
                if it % interval == 0:
                    scheduler.step()
            reports = self._step(
                sampler, test_sampler, batchsize, w_likelihood / total_w if total_w else 0.0,
                w_energy / total_w if total_w else 0.0, w_custom, custom_loss_kwargs, temperature, clip_forces,
                self._lr_factor(it, ipe),
            )
            self.reporter.report(*[np.asarray(r) for r in reports])
            if n_print > 0 and it % n_print == 0 and self._ranks.is_main:
                self.reporter.print(*reports)
            self.iteration += 1
            if self.iteration % ipe == 0:
                record = self._end_epoch(ipe, epoch_schedulers)
                if n_print > 0 and self._ranks.is_main:
                    print(self.summary_line(record))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(
                        epoch=record["epoch"], loss=record["kll"] if self.train_energy else record["nll"],
                        e_max=f"{record['e_max']:.3g}", skip=f"{record['skip_rate']:.0%}",
                    )
        return self.history

    def _synchronise(self) -> None:
        """Under a process group, once: rank 0's parameters to every rank and, unless a
        checkpoint brought them, a random stream per rank (torch, CUDA, NumPy, ``random``)
        seeded from a number drawn on rank 0, so a run is reproducible."""
        ranks = self._ranks
        if not ranks.distributed or self._synchronised:
            return
        ranks.broadcast_module(self.bg)
        for wrapper in self._ddp:
            # buffers are equal now; DDP's own buffer broadcast in its first forward would be a
            # collective outside the trainer's, out of step if a rank failed before that forward
            wrapper.require_forward_param_sync = False
        if self._pending_rng is None:
            base = ranks.broadcast(int(torch.randint(0, 2**62, ())) if ranks.is_main else None)
            seed = rank_seed(base, ranks.rank)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        self._synchronised = True

    def _sampler(self, data, slot: str):
        """The sampler of ``data`` for ``slot`` ("data" or "test"), kept across ``train()``
        calls with the same data so that passes over it continue. Under a process group a
        tensor is sharded: each rank draws from its own disjoint rows."""
        if data is None:
            return None
        key, sampler = self._samplers.get(slot, (None, None))
        if key != id(data):  # the cached sampler holds the data, so its id stays unique
            sampler = _to_sampler(self._ranks.shard(data) if isinstance(data, torch.Tensor) else data)
            pending = self._pending_sampler_state.pop(slot, None)
            if pending is not None and hasattr(sampler, "load_state_dict"):
                sampler.load_state_dict(pending)
            self._samplers[slot] = (id(data), sampler)
        return sampler

    def _lr_factor(self, it: int, ipe: int) -> float:
        """The linear warm-up factor of iteration ``it`` (1 after the warm-up)."""
        if self.lr_warmup_epochs <= 0:
            return 1.0
        return min(1.0, (it + 1) / (self.lr_warmup_epochs * ipe))

    def _optimizer_step(self, lr_factor: float) -> None:
        # the warm-up scales the rate only for this step, so it composes with any scheduler
        if lr_factor != 1.0:
            for group in self.optim.param_groups:
                group["lr"] *= lr_factor
        try:
            self.optim.step()
        finally:
            if lr_factor != 1.0:
                for group in self.optim.param_groups:
                    group["lr"] /= lr_factor

    def _kl_term(self, batchsize: int, temperature: float, clip_forces: Optional[float], weight: float):
        """This rank's KL term as a sum: ``(sum of u(x) - log|det J| over the samples the
        policy includes, how many it includes, how many the gate gated, the log-dets)``.

        The mean is taken after the sums of all ranks are combined. With ``clip_forces`` the
        force on every sample, ``-d energy / dx`` (after the gate's soft cut), is clamped
        component-wise: the gradient of ``weight`` times the sum arriving at ``x`` is
        ``weight`` times that force, so the clamp divides the weight out first.
        """
        z = as_tuple(self.bg.prior.sample(batchsize, temperature=temperature))
        *x, dlogp = self.bg.flow(*z, temperature=temperature)
        if clip_forces is not None:
            scale_box = [torch.tensor(float(weight), device=dlogp.device)]
            x = [clip_gradient(xi, clip_forces, scale_box) for xi in x]
        target = self.gate if self.gate is not None else self.bg._target
        energy = target.energy(*x, temperature=temperature)
        per_sample = (energy - dlogp).view(-1)
        n = per_sample.new_tensor(float(len(per_sample)))
        if self.gate is None:
            return per_sample.sum(), n, torch.zeros_like(n), dlogp.detach().view(-1)
        gated = self.gate.last_gated.view(-1)
        n_gated = gated.sum().to(n.dtype)
        if self.skip_policy == "drop":
            keep = ~gated
            return torch.where(keep, per_sample, 0.0).sum(), keep.sum().to(n.dtype), n_gated, dlogp.detach().view(-1)
        return per_sample.sum(), n, n_gated, dlogp.detach().view(-1)

    def _kl_decision(self, n_included: torch.Tensor, n_gated: torch.Tensor, n_total: int):
        """Whether the (global) KL term applies under the skip policy, and the count its sum
        is divided by; from the numbers of all ranks together, so every rank decides alike."""
        if self.gate is None or self.skip_policy == "clamp":
            return torch.ones((), dtype=torch.bool, device=n_included.device), float(n_total)
        if self.skip_policy == "drop":
            applies = (n_included >= self.min_keep_fraction * n_total) & (n_included > 0)
            return applies, n_included.clamp(min=1)
        return n_gated == 0, float(n_total)  # "batch" and "step"

    def _params(self) -> list:
        # the optimizer's parameters: cheaper to list than walking the module tree each step
        return [p for group in self.optim.param_groups for p in group["params"] if p.requires_grad]

    def _local_gradients(self, params, sampler, batchsize, w_nll, w_kl, w_custom, custom_loss_kwargs,
                         temperature, clip_forces):
        """This rank's part of an iteration, without any communication: the KL gradient (of
        ``w_kl`` times the KL sum) kept apart, the NLL and custom gradient in ``p.grad``, and
        the numbers to combine across ranks (see :data:`_STEP_NUMBERS`)."""
        kl_grads: list = [None] * len(params)
        zero = torch.zeros(())
        kl_sum = n_incl = n_gated = ld_sum = ld_sq = nll = custom = None
        if self.train_energy:
            kl_sum, n_incl, n_gated, dlogp = self._kl_term(batchsize, temperature, clip_forces, w_kl)
            if w_kl > 0 and kl_sum.requires_grad:
                kl_grads = list(torch.autograd.grad(w_kl * kl_sum, params, allow_unused=True))
            ld_sum, ld_sq = dlogp.sum(), dlogp.pow(2).sum()
        loss = None
        if self.train_likelihood:
            batch = as_tuple(sampler.sample(batchsize))
            nll = self.bg.energy(*batch, temperature=temperature).mean()
            if w_nll > 0:
                loss = w_nll * nll
        if w_custom is not None:
            custom = self.custom_loss(**custom_loss_kwargs)
            loss = w_custom * custom if loss is None else loss + w_custom * custom
        if loss is not None and loss.requires_grad:
            loss.backward()
        values = [zero, kl_sum, n_incl, n_gated, ld_sum, ld_sq, nll, custom]
        device = next((v.device for v in values if v is not None), zero.device)
        dtype = params[0].dtype if params else torch.float64
        scalars = torch.stack([(zero if v is None else v.detach()).to(device, dtype).reshape(()) for v in values])
        return kl_grads, [p.grad for p in params], scalars

    def _combine(self, params, kl_grads, grads, scalars):
        """Sum the local results of all ranks in one collective (nothing in a single process).

        A gradient absent on every rank stays ``None``; the NLL and custom gradients and
        losses become means over ranks, the KL sums stay sums.
        """
        ranks = self._ranks
        if not ranks.distributed:
            return kl_grads, grads, scalars
        has = torch.tensor([g is not None for g in kl_grads] + [g is not None for g in grads], dtype=scalars.dtype,
                           device=scalars.device)
        dense = [torch.zeros_like(p) if g is None else g for p, g in zip(params + params, kl_grads + grads)]
        out = ranks.all_reduce(dense + [scalars, has])
        n = len(params)
        kl_grads, grads, scalars, has = out[:n], out[n : 2 * n], out[2 * n], out[2 * n + 1].tolist()
        kl_grads = [g if h > 0 else None for g, h in zip(kl_grads, has[:n])]
        grads = [g / ranks.size if h > 0 else None for g, h in zip(grads, has[n:])]
        scalars = scalars.clone()
        scalars[_MEANS] /= ranks.size
        return kl_grads, grads, scalars

    def _step(self, sampler, test_sampler, batchsize, w_nll, w_kl, w_custom, custom_loss_kwargs,
              temperature, clip_forces, lr_factor) -> list:
        """One iteration. The KL gradient is computed on its own and kept only when the term
        applies and the gradient is finite, so NaN from a few bad samples (0 * NaN in the
        flow's backward) never blocks the NLL step.

        Under a process group each rank computes its gradients locally (DDP wrappers under
        ``no_sync``), then one collective sums them together with the counts that decide the
        skip; every rank takes the same decision from the same numbers. A rank whose local
        part raises takes part in the collective with a failure flag, and every rank raises,
        so none waits forever. Two values are read back to the host: the decision and the
        losses, then the gradient norm (under a process group also, before them, which
        gradients exist on any rank).
        """
        self.optim.zero_grad(set_to_none=True)
        params = self._params()
        ranks = self._ranks
        failure = None
        try:
            with ranks.no_sync(self._ddp):
                local = self._local_gradients(params, sampler, batchsize, w_nll, w_kl, w_custom,
                                              custom_loss_kwargs, temperature, clip_forces)
        except Exception as exc:
            if not ranks.distributed:
                raise
            failure = exc
            self.optim.zero_grad(set_to_none=True)
            dtype = params[0].dtype if params else torch.float64
            flag = torch.zeros(len(_STEP_NUMBERS), dtype=dtype)
            flag[_STEP_NUMBERS.index("failed")] = 1.0
            local = ([None] * len(params), [None] * len(params), flag)
        kl_grads, grads, scalars = self._combine(params, *local)
        failed, kl_sum, n_incl, n_gated, ld_sum, ld_sq, nll, custom = scalars.unbind()

        n_total = batchsize * ranks.size
        kl_ok = torch.zeros((), dtype=torch.bool)
        kll = applies = kl_sum
        if self.train_energy:
            applies, denominator = self._kl_decision(n_incl, n_gated, n_total)
            kll, kl_ok = kl_sum / denominator, applies
            kl_grads = [None if g is None else g / denominator for g in kl_grads]
            present = [g for g in kl_grads if g is not None]
            if present:
                kl_ok = applies & torch.stack(torch._foreach_norm(present)).isfinite().all()
        values = torch.stack(
            [failed, kll, applies.to(kll.dtype), kl_ok.to(kll.device, kll.dtype), ld_sum, ld_sq, nll, custom]
        )
        failed_v, kll_v, applies_v, ok_v, ld_sum_v, ld_sq_v, nll_v, custom_v = values.double().tolist()
        if failed_v > 0:
            if failure is not None:
                try:
                    raise failure
                finally:  # the traceback holds this frame: do not let the frame hold the error
                    failure = None
            raise RankFailure(
                f"iteration {self.iteration}: training failed on {int(failed_v)} other rank(s); "
                f"their error is in their output"
            )
        kl_ok = self.train_energy and ok_v > 0.5
        for p, g_kl, g in zip(params, kl_grads, grads):
            if kl_ok and g_kl is not None:
                g = g_kl if g is None else g + g_kl
            p.grad = g
        with_grad = [p.grad for p in params if p.grad is not None]
        if not with_grad:
            norm = torch.zeros(())
        elif self.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_grad_norm)
        else:  # the total norm only tells whether every gradient is finite
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(with_grad)))
        grads_finite = math.isfinite(norm.item())

        acc = self._acc
        acc.steps += 1
        reports = []
        if self.train_energy:
            acc.batches += 1
            acc.logdet_sum += ld_sum_v
            acc.logdet_sq += ld_sq_v
            acc.logdet_n += n_total
            if kl_ok:
                acc.kll_sum += kll_v
                acc.kll_n += 1
            else:
                acc.batches_skipped += 1
                acc.kl_nonfinite += applies_v > 0.5  # the policy kept it, its gradient was not finite
            reports.append(kll_v if kl_ok else math.nan)  # a skipped term is absent, never 0
        nothing = not with_grad
        skip_step = (self.skip_policy == "step" and self.train_energy and not kl_ok) or nothing
        if not grads_finite:
            acc.nonfinite_steps += 1
        if skip_step or not grads_finite:
            acc.steps_skipped += 1
        else:
            self._optimizer_step(lr_factor)
            if self.train_likelihood:
                acc.nll_sum += nll_v
                acc.nll_n += 1
        if self.train_likelihood:
            reports.append(nll_v)
        if self.test_likelihood:
            test_nll = math.nan
            if test_sampler is not None:
                with torch.no_grad():
                    test_batch = as_tuple(test_sampler.sample(batchsize))
                    test_nll = self.bg.energy(*test_batch, temperature=temperature).mean().item()
            reports.append(test_nll)
        if "Custom" in getattr(self.reporter, "_labels", ()):  # the host's reporter has the label
            reports.append(custom_v if w_custom is not None else math.nan)
        return reports

    def _end_epoch(self, ipe: int, epoch_schedulers: Sequence) -> dict:
        acc = self._acc
        epoch = self.iteration // ipe - 1  # the epoch just finished
        if self.gate is not None:
            self.gate.all_reduce_statistics(self._ranks)  # the counters in acc are global already
        gate_stats = self.gate.statistics("epoch") if self.gate is not None else {}
        n = acc.logdet_n
        ld_mean = acc.logdet_sum / n if n else math.nan
        ld_std = math.sqrt(max(acc.logdet_sq / n - ld_mean**2, 0.0)) if n else math.nan
        record = {
            "epoch": epoch,
            "e_max": gate_stats.get("e_max", math.nan),
            "scheduled_e_max": gate_stats.get("scheduled_e_max", math.nan),
            "batches": acc.batches,
            "batches_skipped": acc.batches_skipped,
            "skip_rate": acc.batches_skipped / acc.batches if acc.batches else 0.0,
            "steps_skipped": acc.steps_skipped,
            "nonfinite_steps": acc.nonfinite_steps,
            "kl_nonfinite": acc.kl_nonfinite,
            "samples": gate_stats.get("samples", 0),
            "samples_gated": gate_stats.get("gated", 0),
            "nonfinite": gate_stats.get("nonfinite", 0),
            "energy_p50": gate_stats.get("energy_p50", math.nan),
            "energy_p90": gate_stats.get("energy_p90", math.nan),
            "energy_max": gate_stats.get("energy_max", math.nan),
            "kll": acc.kll_sum / acc.kll_n if acc.kll_n else math.nan,
            "nll": acc.nll_sum / acc.nll_n if acc.nll_n else math.nan,
            "logdet_mean": ld_mean,
            "logdet_std": ld_std,
            "lr": self.optim.param_groups[0]["lr"] * self._lr_factor(self.iteration - 1, ipe),
            "seconds": time.perf_counter() - acc.start,
            "alerts": [],
            "actions": [],
        }
        self.history.append(record)
        stage = self.gate.schedule.stage_of(epoch) if self.gate is not None else "default"
        with warnings.catch_warnings():
            if not self._ranks.is_main:  # every rank decides alike; rank 0 speaks
                warnings.simplefilter("ignore", TrainingHealthWarning)
            checks = self.monitor.check(self.history, stage)
        for name, message in checks:
            record["alerts"].append(message)
            if name in self.STALL_CHECKS and self.on_stall == "relax" and self.gate is not None:
                self.gate.relax(self.relax_factor)
                action = f"epoch {epoch}: relaxed E_max by x{self.relax_factor:g} to {self.gate.e_max:.3g} kJ/mol"
                record["actions"].append(action)
                self.monitor.rearm(name, epoch + 1)
        for scheduler in epoch_schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = record["kll"] if math.isfinite(record["kll"]) else record["nll"]
                if math.isfinite(metric):
                    scheduler.step(metric)
            else:
                scheduler.step()
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, epoch)
        self._acc = _EpochAccumulator()
        if self.checkpoint_every and (epoch + 1) % self.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint_path)
        return record

    # -- reporting ---------------------------------------------------------------------

    @staticmethod
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

    def write_history(self, path: Union[str, Path]) -> None:
        """Write the history as CSV (``.csv``) or JSON lines (``.jsonl``)."""
        write_history(self.history, path)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: model (gate included),
        optimizer, counters, history, monitor, LR warm-up, and per rank the data order, the
        random states and the gate's running epoch statistics.

        Under a process group this gathers every rank's part, so every rank must call it.
        The model's state has no DDP ``module.`` level, so it loads with or without DDP.
        """
        samplers = dict(self._pending_sampler_state)
        for slot, (_, sampler) in self._samplers.items():
            if hasattr(sampler, "state_dict"):
                samplers[slot] = sampler.state_dict()
        own = {
            "samplers": samplers,
            "rng": self._pending_rng or {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "gate_epoch": None if self.gate is None else self.gate.epoch_statistics.state_dict(),
        }
        return {
            "bg": plain_state_dict(self.bg),
            "optim": self.optim.state_dict(),
            "iteration": self.iteration,
            "iters_per_epoch": self.iters_per_epoch,
            "history": [dict(r) for r in self.history],
            "monitor": self.monitor.state_dict(),
            "epoch_counters": {k: v for k, v in vars(self._acc).items() if k != "start"},
            "reporter": [list(r) for r in getattr(self.reporter, "_raw", [])],
            "ranks": self._ranks.gather(own),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; a state of ``N`` ranks needs ``N`` ranks."""
        ranks = state["ranks"]
        if len(ranks) != self._ranks.size:
            raise ValueError(
                f"the checkpoint was written by {len(ranks)} process(es) and this run has {self._ranks.size}; "
                f"resume it with the same number (torchrun --nproc_per_node={len(ranks)}), or load only its "
                f"weights: bg.load_state_dict(torch.load(path)['bg'])"
            )
        own = ranks[self._ranks.rank]
        self.bg.load_state_dict(wrapped_state_dict(self.bg, state["bg"]))
        self.optim.load_state_dict(state["optim"])
        self.iteration = int(state["iteration"])
        self.iters_per_epoch = state["iters_per_epoch"]
        self.history = [dict(r) for r in state["history"]]
        self.monitor.load_state_dict(state["monitor"])
        if hasattr(self.reporter, "_raw"):
            self.reporter._raw = [list(r) for r in state["reporter"]]
        self._samplers = {}
        self._pending_sampler_state = dict(own["samplers"])
        if self.gate is not None and own["gate_epoch"] is not None:
            stats = EnergyStatistics()
            stats.load_state_dict(own["gate_epoch"])
            self.gate.epoch_statistics = stats
        self._acc = _EpochAccumulator()  # a checkpoint may be taken mid-epoch
        for key, value in state["epoch_counters"].items():
            setattr(self._acc, key, value)
        # restored when training continues, after the data sampler is rebuilt (building it
        # draws a shuffle order from the random number generators)
        self._pending_rng = own["rng"]

    def _restore_rng(self) -> None:
        rng, self._pending_rng = self._pending_rng, None
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically (a temporary file, then a rename),
        so a run killed mid-write leaves the previous checkpoint intact.

        Under a process group every rank must call it: the ranks' parts are gathered, rank 0
        writes, and all return once the file is in place.
        """
        path = Path(path)
        state = self.state_dict()

        def write():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    torch.save(state, fh)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        self._ranks.on_main(write)
        return path

    def resume(self, path: Union[str, Path]) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (every rank reads it)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
