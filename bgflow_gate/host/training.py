"""``KLTrainer`` and ``LossReporter``, following bgflow's behaviour.

This is the plain trainer: iteration-based, energy (reverse KL) and likelihood (NLL)
losses weighted as ``w_energy / (w_energy + w_likelihood)`` and
``w_likelihood / (w_energy + w_likelihood)``, an optimisation step skipped only when a
gradient contains NaN, and ``clip_forces`` accepted but ignored (as in bgflow).
:class:`bgflow_gate.ProgressiveKLTrainer` builds on it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import numpy as np
import torch

from .distributions import DataSetSampler, as_tuple

__all__ = ["LossReporter", "KLTrainer"]


class LossReporter:
    """Collects one value per iteration for each labelled loss.

    Parameters
    ----------
    *labels : str
        The names of the losses, in the order they are reported.
    """

    def __init__(self, *labels: str):
        self._labels = labels
        self._raw: list[list[float]] = [[] for _ in labels]

    def report(self, *losses) -> None:
        """Append one value per label (tensors are read back as floats)."""
        if len(losses) != len(self._labels):
            raise ValueError(f"expected {len(self._labels)} losses ({', '.join(self._labels)}), got {len(losses)}")
        for raw, loss in zip(self._raw, losses):
            raw.append(float(loss.detach().cpu()) if isinstance(loss, torch.Tensor) else float(loss))

    def print(self, *losses) -> None:
        """Print the iteration count and the last reported value of each loss."""
        parts = [f"{len(self._raw[0]) if self._raw else 0}"]
        parts += [f"{label}: {raw[-1]:.4f}" for label, raw in zip(self._labels, self._raw)]
        print("\t".join(parts))

    def losses(self, n_smooth: int = 1):
        """``(labels, iterations, values)`` with values smoothed by a running mean of ``n_smooth``."""
        kernel = np.ones(n_smooth) / n_smooth
        ys = [np.convolve(np.asarray(raw, dtype=float), kernel, mode="valid") for raw in self._raw]
        x = np.arange(n_smooth, len(self._raw[0]) + 1) if self._raw else np.arange(0)
        return self._labels, x, ys

    def recent(self, n_recent: int = 1) -> np.ndarray:
        """The last ``n_recent`` values of each loss, ``[n_labels, n_recent]``."""
        return np.array([raw[-n_recent:] for raw in self._raw])


class KLTrainer:
    """Train a Boltzmann generator by reverse KL (energy), NLL (likelihood), or both.

    Parameters
    ----------
    bg : BoltzmannGenerator
        The generator.
    optim : torch.optim.Optimizer, optional
        Default: Adam over ``bg.parameters()`` with learning rate 5e-3.
    train_likelihood, train_energy : bool
        Which losses to train (each with weight 1 unless ``train`` overrides it).
    custom_loss : callable, optional
        Called as ``custom_loss(**custom_loss_kwargs)`` when ``train`` gets ``w_custom``;
        reported as ``Custom`` (NaN in iterations without ``w_custom``).
    test_likelihood : bool
        Also report the NLL of a test batch.
    """

    def __init__(
        self,
        bg,
        optim: torch.optim.Optimizer | None = None,
        train_likelihood: bool = True,
        train_energy: bool = True,
        custom_loss: Callable | None = None,
        test_likelihood: bool = False,
    ):
        self.bg = bg
        self.optim = optim if optim is not None else torch.optim.Adam(bg.parameters(), lr=5e-3)
        self.train_likelihood = train_likelihood
        self.train_energy = train_energy
        self.test_likelihood = test_likelihood
        self.w_energy = 1.0 if train_energy else 0.0
        self.w_likelihood = 1.0 if train_likelihood else 0.0
        labels = (["KLL"] if train_energy else []) + (["NLL"] if train_likelihood else [])
        labels += ["NLL(Test)"] if test_likelihood else []
        labels += ["Custom"] if custom_loss is not None else []
        self.reporter = LossReporter(*labels)
        self.custom_loss = custom_loss

    def train(
        self, n_iter: int, data=None, testdata=None, batchsize: int = 128,
        w_likelihood: float | None = None, w_energy: float | None = None,
        w_custom: float | None = None, custom_loss_kwargs: dict = {}, n_print: int = 0,
        temperature: float = 1.0, schedulers: Iterable = (), clip_forces=None,
        progress_bar: Callable = lambda x: x,
    ) -> None:
        """Run ``n_iter`` optimisation steps.

        Parameters
        ----------
        n_iter : int
            Number of iterations.
        data, testdata : torch.Tensor or Sampler, optional
            Training and test data (needed for likelihood training / testing).
        batchsize : int
            Samples per batch, for both losses.
        w_likelihood, w_energy : float, optional
            Override the loss weights of the constructor.
        w_custom : float, optional
            Weight of the custom loss (off when ``None``).
        custom_loss_kwargs : dict
            Keyword arguments of the custom loss.
        n_print : int
            Print the losses every ``n_print`` iterations (0: never).
        temperature : float
            Relative temperature of sampling and energies.
        schedulers : iterable of (int, scheduler)
            ``scheduler.step()`` is called every ``interval`` iterations, before the step.
        clip_forces : ignored
            Accepted for compatibility; bgflow ignores it and so does this trainer.
        progress_bar : callable
            Wraps the iteration range (e.g. ``tqdm.tqdm``).
        """
        if clip_forces is not None:
            warnings.warn("clip_forces is deprecated and ignored", DeprecationWarning, stacklevel=2)
        weights = (w_likelihood, w_energy, w_custom)
        iteration = _Iteration(self, data, testdata, batchsize, temperature, weights, custom_loss_kwargs)
        for it in progress_bar(range(n_iter)):
            for interval, scheduler in schedulers:
                if it % interval == 0:
                    scheduler.step()
            self.optim.zero_grad()
            self.reporter.report(*iteration.backward())
            if n_print > 0 and it % n_print == 0:
                self.reporter.print()
            _step_unless_nan(self.optim, self.bg.parameters())

    def losses(self, n_smooth: int = 1):
        """The reporter's losses (see :meth:`LossReporter.losses`)."""
        return self.reporter.losses(n_smooth=n_smooth)


def _as_sampler(data):
    """A tensor becomes a :class:`DataSetSampler`; samplers and ``None`` pass through."""
    return DataSetSampler(data) if isinstance(data, torch.Tensor) else data


def _step_unless_nan(optim: torch.optim.Optimizer, parameters: Iterable) -> None:
    """``optim.step()``, skipped (with bgflow's message) when a gradient contains NaN."""
    if any(torch.isnan(p.grad).any() for p in parameters if p.grad is not None):
        print("found nan in grad; skipping optimization step")
    else:
        optim.step()


class _Iteration:
    """The losses of one :meth:`KLTrainer.train` call: computed, back-propagated, reported.

    Parameters
    ----------
    trainer : KLTrainer
        Gives the generator, the custom loss, the default weights and which losses are
        trained and tested.
    data, testdata : torch.Tensor, Sampler or None
        Training and test data.
    batchsize : int
        Samples per batch.
    temperature : float
        Relative temperature.
    weights : tuple of (float or None, float or None, float or None)
        ``(w_likelihood, w_energy, w_custom)`` as given to ``train``; ``None`` takes the
        trainer's weight (the custom loss: off).
    custom_loss_kwargs : dict
        Keyword arguments of the custom loss.
    """

    def __init__(self, trainer: KLTrainer, data, testdata, batchsize: int, temperature: float,
                 weights: tuple, custom_loss_kwargs: dict):
        if trainer.train_likelihood and data is None:
            raise ValueError("likelihood training needs data; pass data= to train()")
        if trainer.custom_loss is None and weights[2] is not None:
            raise ValueError("w_custom needs a custom_loss, given to the constructor")
        self.trainer = trainer
        self.data, self.testdata = _as_sampler(data), _as_sampler(testdata)
        self.batchsize, self.temperature = batchsize, temperature
        w_likelihood, w_energy, self.w_custom = weights
        self.w_likelihood = trainer.w_likelihood if w_likelihood is None else w_likelihood
        self.w_energy = trainer.w_energy if w_energy is None else w_energy
        self.custom_loss_kwargs = custom_loss_kwargs

    def backward(self) -> list:
        """Back-propagate the weighted losses; return the values to report, in label order."""
        trainer = self.trainer
        reports = []
        total = self.w_likelihood + self.w_energy
        if trainer.train_energy:
            kll = trainer.bg.kldiv(self.batchsize, temperature=self.temperature).mean()
            reports.append(self._backward(kll, self.w_energy / total if self.w_energy > 0 else None))
        if trainer.train_likelihood:
            nll = self._nll(self.data)
            reports.append(self._backward(nll, self.w_likelihood / total if self.w_likelihood > 0 else None))
        if trainer.test_likelihood:
            with torch.no_grad():
                reports.append(torch.zeros(()) if self.testdata is None else self._nll(self.testdata))
        if trainer.custom_loss is not None:
            reports.append(self._custom())
        return reports

    def _nll(self, sampler) -> torch.Tensor:
        batch = as_tuple(sampler.sample(self.batchsize))
        return self.trainer.bg.energy(*batch, temperature=self.temperature).mean()

    def _custom(self) -> torch.Tensor:
        if self.w_custom is None:
            return torch.tensor(float("nan"))
        custom = self.trainer.custom_loss(**self.custom_loss_kwargs)
        return self._backward(custom, self.w_custom)

    @staticmethod
    def _backward(loss: torch.Tensor, weight: float | None) -> torch.Tensor:
        if weight is not None:
            (weight * loss).backward(retain_graph=True)
        return loss
