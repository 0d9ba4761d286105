"""One training iteration: the KL and NLL gradients, combined across ranks, and the
decision whether the KL term applies.

The numbers of an iteration that decide it travel together as :class:`StepNumbers` (one
tensor, all-reduced with the gradients in one collective); what the trainer books for the
iteration is a :class:`StepOutcome`. :class:`KLStep` produces the outcome; the trainer
then takes (or skips) the optimiser step.

What a KL sample contributes: below E_cut ``u(x) - log|det J|`` (exact); between E_cut and
E_max what the gate's ``above_cut`` option says
(:meth:`~bgflow_gate.ScheduledEnergyGate.kl_terms`); gated samples what the skip policy
says (:mod:`~bgflow_gate.training.policies`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch

from ..distributed import RankFailure, Ranks
from .gradients import GradientSet, add_kl, clip_total_norm, combine, split_gradients, all_finite
from ..validation import check_number, check_whole
from .policies import SkipPolicy

__all__ = ["StepNumbers", "StepSettings", "StepOutcome", "KLStep", "clip_gradient", "held_out_nll"]


class StepNumbers(NamedTuple):
    """The numbers of one iteration, in the order they are combined across ranks.

    Sums over the KL samples, except ``nll`` and ``custom`` (per-rank means, averaged) and
    the flags ``failed`` (ranks whose part raised) and ``other_finite`` (ranks whose NLL /
    custom gradient is finite).
    """

    failed: Any  #: 1 on a rank whose part of the iteration raised
    kl_sum: Any  #: sum of the per-sample KL terms of the included samples
    included: Any  #: samples in that sum
    gated: Any  #: samples the gate gated
    above_cut: Any  #: samples between E_cut and E_max
    logdet_sum: Any  #: sum of log|det J| over the KL samples
    logdet_sq: Any  #: sum of its squares
    nll: Any  #: the NLL loss
    custom: Any  #: the custom loss
    other_finite: Any  #: 1 if the NLL / custom gradient is finite

    #: fields that are means across ranks, not sums
    MEANS = ("nll", "custom")
    #: fields that are logical AND across ranks (combined as sums compared to the rank count)
    FLAGS = ("other_finite",)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The per-``train()`` settings every iteration uses."""

    train_energy: bool
    train_likelihood: bool
    custom_loss: Callable | None
    batchsize: int
    w_nll: float  #: the likelihood weight, normalised with w_kl to sum 1
    w_kl: float
    w_custom: float | None
    custom_loss_kwargs: dict
    temperature: float
    clip_forces: float | None

    @classmethod
    def of_train(cls, trainer, data, batchsize, w_likelihood, w_energy, w_custom, custom_loss_kwargs,
                 temperature, clip_forces) -> "StepSettings":
        """Validate the arguments of a trainer's ``train()`` call into settings."""
        check_whole(batchsize, "batchsize", 1)
        w_likelihood = trainer.w_likelihood if w_likelihood is None else w_likelihood
        w_energy = trainer.w_energy if w_energy is None else w_energy
        if clip_forces is not None:
            clip_forces = check_number(clip_forces, "clip_forces", "force", lower=0, strict=True)
        if trainer.train_likelihood and data is None:
            raise ValueError("likelihood training needs data; pass data= to train()")
        if w_custom is not None and trainer.custom_loss is None:
            raise ValueError("w_custom needs a custom_loss, given to the constructor")
        total = w_likelihood + w_energy
        if total <= 0 and w_custom is None:
            raise ValueError("w_likelihood + w_energy must be positive")
        return cls(trainer.train_energy, trainer.train_likelihood, trainer.custom_loss, batchsize,
                   w_likelihood / total if total else 0.0, w_energy / total if total else 0.0,
                   w_custom, dict(custom_loss_kwargs), temperature, clip_forces)


@dataclasses.dataclass
class StepOutcome:
    """What one iteration did, as host numbers (read back once)."""

    numbers: StepNumbers  #: combined over ranks (floats)
    kl_drawn: bool  #: a KL batch was drawn (energy training)
    kl_applied: bool  #: its term entered the gradient
    kl_nonfinite: bool  #: the policy kept it, but its gradient was not finite
    kll: float  #: its mean loss (nan when it did not apply)
    n_samples: int  #: KL samples of all ranks
    grads_finite: bool
    stepped: bool  #: the optimiser step is to be taken
    nll_trained: bool  #: ... and it trained the likelihood


class KLStep:
    """Computes iterations of mixed NLL + gated KL training for one generator.

    Parameters
    ----------
    generator : bgflow.BoltzmannGenerator
    target : bgflow.Energy or None
        The KL term's energy: the gate, or the raw target (``gate=False``); ``None``
        without energy training.
    gate : ScheduledEnergyGate or None
    policy : SkipPolicy
    ranks : Ranks
    max_grad_norm : float or None
        Clip the total gradient norm to this.
    """

    def __init__(self, generator, target, gate, policy: SkipPolicy, ranks: Ranks, max_grad_norm: float | None):
        self.generator, self.target, self.gate, self.policy = generator, target, gate, policy
        self.ranks, self.params = ranks, []
        self.max_grad_norm = max_grad_norm
        self.ddp = [m for m in generator.modules() if isinstance(m, torch.nn.parallel.DistributedDataParallel)]

    # -- the local part ------------------------------------------------------------------

    def kl_terms(self, s: StepSettings, force_scale: list):
        """Fresh samples' KL contributions: ``(sum over included samples, included,
        gated, above E_cut, log-dets [n])``. With ``clip_forces``, ``force_scale[0]`` must
        hold the loss's factor on the sum before the backward pass (see :func:`clip_gradient`)."""
        prior, flow = self.generator.prior, self.generator.flow
        z = _as_tuple(prior.sample(s.batchsize, temperature=s.temperature))
        *x, dlogp = flow(*z, temperature=s.temperature)
        if s.clip_forces is not None:
            x = [clip_gradient(xi, s.clip_forces, force_scale) for xi in x]
        energy = self.target.energy(*x, temperature=s.temperature)
        dlogp = dlogp.reshape(-1)
        if self.gate is None:
            per_sample = energy.reshape(-1) - dlogp
            n = per_sample.new_tensor(float(len(per_sample)))
            return per_sample.sum(), n, torch.zeros_like(n), torch.zeros_like(n), dlogp.detach()
        per_sample, counted, above = self.gate.kl_terms(energy, dlogp)
        gated = self.gate.last_gated.reshape(-1)
        keep = self.policy.includes(gated) & counted
        return (torch.where(keep, per_sample, 0.0).sum(), keep.sum().to(per_sample.dtype),
                gated.sum().to(per_sample.dtype), above.sum().to(per_sample.dtype), dlogp.detach())

    def local(self, sampler, s: StepSettings) -> tuple[GradientSet, torch.Tensor]:
        """This rank's gradients (KL kept apart) and numbers, without communication."""
        kl_sum = included = gated = above = ld = nll = custom = None
        kl_grads = None
        if s.train_energy:
            force_scale: list = []
            kl_sum, included, gated, above, ld = self.kl_terms(s, force_scale)
            if s.w_kl > 0 and kl_sum.requires_grad:
                # in one process the mean's divisor is known now: differentiate the mean itself
                scale = s.w_kl if self.ranks.distributed else s.w_kl / self.policy.applies(
                    included.detach(), gated, s.batchsize)[1]
                force_scale.append(scale)
                kl_grads = torch.autograd.grad(scale * kl_sum, self.params, allow_unused=True)
        loss = None
        if s.train_likelihood:
            nll = self.generator.energy(*_as_tuple(sampler.sample(s.batchsize)), temperature=s.temperature).mean()
            loss = s.w_nll * nll if s.w_nll > 0 else None
        if s.w_custom is not None:
            custom = s.custom_loss(**s.custom_loss_kwargs)
            loss = s.w_custom * custom if loss is None else loss + s.w_custom * custom
        if loss is not None and loss.requires_grad:
            loss.backward()
        grads = split_gradients(self.params, kl_grads)
        numbers = StepNumbers(
            failed=None, kl_sum=kl_sum, included=included, gated=gated, above_cut=above,
            logdet_sum=None if ld is None else ld.sum(), logdet_sq=None if ld is None else ld.pow(2).sum(),
            nll=nll, custom=custom, other_finite=all_finite(grads.other),
        )
        return grads, _stack(numbers, self.params)

    # -- the whole iteration -------------------------------------------------------------

    def run(self, optim: torch.optim.Optimizer, sampler, s: StepSettings, iteration: int = 0) -> StepOutcome:
        """One iteration up to (not including) the optimiser step: gradients in ``p.grad``.

        Under a process group the local parts are summed in one collective, and every
        rank decides from the same numbers. A rank whose part raises joins the collective
        with a failure flag, and every rank raises, so none waits forever. One read back
        to the host.
        """
        optim.zero_grad(set_to_none=True)
        self.params = [p for group in optim.param_groups for p in group["params"] if p.requires_grad]
        failure = None
        try:
            with self.ranks.no_sync(self.ddp):
                grads, numbers = self.local(sampler, s)
        except Exception as exc:
            if not self.ranks.distributed:
                raise
            failure, grads, numbers = exc, GradientSet.empty(len(self.params)), _failure_numbers(self.params)
            optim.zero_grad(set_to_none=True)
        grads, numbers = combine(self.ranks, self.params, grads, numbers, StepNumbers)
        return self._decide(grads, numbers, s, failure, iteration)

    def _decide(self, grads: GradientSet, numbers: torch.Tensor, s: StepSettings,
                failure: Exception | None, iteration: int) -> StepOutcome:
        train_energy = s.train_energy
        n_total = s.batchsize * self.ranks.size
        t = StepNumbers(*numbers.unbind())
        applies, kl_ok, kll = torch.zeros((), dtype=torch.bool), torch.zeros((), dtype=torch.bool), t.kl_sum
        if train_energy:
            applies, denominator = self.policy.applies(t.included, t.gated, n_total)
            kll = t.kl_sum / denominator
            if self.ranks.distributed:  # the ranks' gradients of sums, now the global mean's
                grads = grads.scaled_kl(denominator)
            kl_ok = applies & all_finite(grads.kl)
        decision = torch.stack([kll, applies.to(kll), kl_ok.to(kll)])
        values = torch.cat([numbers, decision]).double().tolist()  # the one read back to the host
        host, read = StepNumbers(*values[: len(numbers)]), values[len(numbers):]
        _raise_on_failure(host.failed, failure, iteration)
        kl_ok = train_energy and read[2] > 0.5
        with_grad = add_kl(self.params, grads, kl_ok)
        if with_grad and self.max_grad_norm:
            clip_total_norm(with_grad, self.max_grad_norm)
        grads_finite = host.other_finite > 0.5
        skip = not with_grad or (self.policy.skips_step and train_energy and not kl_ok) or not grads_finite
        return StepOutcome(
            numbers=host, kl_drawn=train_energy, kl_applied=kl_ok,
            kl_nonfinite=train_energy and not kl_ok and read[1] > 0.5, kll=read[0] if kl_ok else float("nan"),
            n_samples=n_total, grads_finite=grads_finite, stepped=not skip,
            nll_trained=s.train_likelihood and not skip,
        )


def held_out_nll(generator, sampler, s: StepSettings) -> float:
    """The generator's NLL on a batch of test data (nan without a test sampler)."""
    if sampler is None:
        return float("nan")
    with torch.no_grad():
        batch = _as_tuple(sampler.sample(s.batchsize))
        return generator.energy(*batch, temperature=s.temperature).mean().item()


def _as_tuple(x) -> tuple:
    return x if isinstance(x, (tuple, list)) else (x,)


def _stack(numbers: StepNumbers, params: list) -> torch.Tensor:
    """The numbers as one tensor (``None`` -> 0) in the parameters' dtype."""
    present = [v for v in numbers if v is not None]
    device = present[0].device if present else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float64
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.stack([zero if v is None else v.detach().to(device, dtype).reshape(()) for v in numbers])


def _failure_numbers(params: list) -> torch.Tensor:
    numbers = torch.zeros(len(StepNumbers._fields), dtype=params[0].dtype if params else torch.float64)
    numbers[StepNumbers._fields.index("failed")] = 1.0
    numbers[StepNumbers._fields.index("other_finite")] = 1.0
    return numbers


def _raise_on_failure(failed: float, failure: Exception | None, iteration: int) -> None:
    if failed <= 0:
        return
    if failure is not None:
        raise failure
    raise RankFailure(
        f"iteration {iteration}: training failed on {int(failed)} other rank(s); their error is in their output")


class _ClipGradient(torch.autograd.Function):
    """Identity whose backward clamps ``grad / scale`` to ``[-limit, limit]`` (and scales back);
    ``scale`` is read from a one-element list when the backward pass runs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, limit: float, scale_box: list):
        ctx.limit, ctx.scale_box = limit, scale_box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = ctx.scale_box[0] if ctx.scale_box else 1.0
        scale = torch.where(torch.as_tensor(scale) != 0, torch.as_tensor(scale), 1.0).to(grad)
        return (grad / scale).clamp(-ctx.limit, ctx.limit) * scale, None, None


def clip_gradient(x: torch.Tensor, limit: float, scale_box: list | None = None) -> torch.Tensor:
    """Identity on ``x`` whose backward clamps each gradient component to ``[-limit, limit]``
    after dividing by ``scale_box[0]`` (and multiplies back). The box may be filled after
    this call, before the backward pass: with the loss's factor on a sum of energies there
    (known only once the batch's kept samples are counted), the clamp acts on the force
    ``-dE/dx`` of each sample. An empty box means 1."""
    return _ClipGradient.apply(x, limit, scale_box if scale_box is not None else [])
