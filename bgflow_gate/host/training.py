"""``KLTrainer`` and ``LossReporter``, following bgflow's behaviour.

This is the plain trainer: iteration-based, energy (reverse KL) and likelihood (NLL)
losses weighted as ``w_energy / (w_energy + w_likelihood)`` and
``w_likelihood / (w_energy + w_likelihood)``, an optimisation step skipped only when a
gradient contains NaN, and ``clip_forces`` accepted but ignored (as in bgflow).
:class:`bgflow_gate.ProgressiveKLTrainer` builds on it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

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
        optim: Optional[torch.optim.Optimizer] = None,
        train_likelihood: bool = True,
        train_energy: bool = True,
        custom_loss: Optional[Callable] = None,
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
        self,
        n_iter: int,
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
        clip_forces=None,
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
        w_likelihood = self.w_likelihood if w_likelihood is None else w_likelihood
        w_energy = self.w_energy if w_energy is None else w_energy
        if clip_forces is not None:
            warnings.warn("clip_forces is deprecated and ignored", DeprecationWarning, stacklevel=2)
        if isinstance(data, torch.Tensor):
            data = DataSetSampler(data)
        if isinstance(testdata, torch.Tensor):
            testdata = DataSetSampler(testdata)
        if self.train_likelihood and data is None:
            raise ValueError("likelihood training needs data; pass data= to train()")

        for it in progress_bar(range(n_iter)):
            for interval, scheduler in schedulers:
                if it % interval == 0:
                    scheduler.step()
            self.optim.zero_grad()
            reports = []
            total = w_likelihood + w_energy
            if self.train_energy:
                kll = self.bg.kldiv(batchsize, temperature=temperature).mean()
                reports.append(kll)
                if w_energy > 0:
                    (w_energy / total * kll).backward(retain_graph=True)
            if self.train_likelihood:
                batch = as_tuple(data.sample(batchsize))
                nll = self.bg.energy(*batch, temperature=temperature).mean()
                reports.append(nll)
                if w_likelihood > 0:
                    (w_likelihood / total * nll).backward(retain_graph=True)
            if self.test_likelihood:
                test_nll = torch.zeros(())
                if testdata is not None:
                    with torch.no_grad():
                        test_batch = as_tuple(testdata.sample(batchsize))
                        test_nll = self.bg.energy(*test_batch, temperature=temperature).mean()
                reports.append(test_nll)
            if self.custom_loss is not None:
                custom = torch.tensor(float("nan"))
                if w_custom is not None:
                    custom = self.custom_loss(**custom_loss_kwargs)
                    (w_custom * custom).backward(retain_graph=True)
                reports.append(custom)
            elif w_custom is not None:
                raise ValueError("w_custom needs a custom_loss, given to the constructor")
            self.reporter.report(*reports)
            if n_print > 0 and it % n_print == 0:
                self.reporter.print()
            if any(torch.isnan(p.grad).any() for p in self.bg.parameters() if p.grad is not None):
                print("found nan in grad; skipping optimization step")
            else:
                self.optim.step()

    def losses(self, n_smooth: int = 1):
        """The reporter's losses (see :meth:`LossReporter.losses`)."""
        return self.reporter.losses(n_smooth=n_smooth)
