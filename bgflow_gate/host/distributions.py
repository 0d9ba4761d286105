"""Samplers and distributions: ``Sampler``, ``NormalDistribution``, ``DataSetSampler``.

Conventions follow bgflow: ``sample(n_samples, temperature=1.0)`` returns one tensor
``[n, ...]`` (or a tuple for joint distributions); a distribution is also an ``Energy``
whose ``energy`` is its negative log density.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .energy import Energy

__all__ = ["Sampler", "NormalDistribution", "DataSetSampler", "as_tuple", "unpack"]

Samples = torch.Tensor | tuple


def as_tuple(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    """A tensor as a one-element tuple; a sequence of tensors as a tuple."""
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def unpack(xs: Sequence[torch.Tensor]) -> Samples:
    """A one-element sequence as its tensor; longer sequences as a tuple."""
    xs = as_tuple(xs)
    return xs[0] if len(xs) == 1 else xs


class Sampler(torch.nn.Module):
    """Base class of samplers.

    Parameters
    ----------
    return_hook : callable, optional
        Applied to the list of sampled tensors before they are returned.
    """

    def __init__(self, return_hook: Callable = lambda x: x, **kwargs):
        super().__init__(**kwargs)
        self.return_hook = return_hook

    def _sample(self, n_samples: int, *args, **kwargs) -> Samples:
        raise NotImplementedError(f"{type(self).__name__} does not implement _sample")

    def _sample_with_temperature(self, n_samples: int, temperature, *args, **kwargs) -> Samples:
        raise NotImplementedError(f"{type(self).__name__} cannot sample at a temperature")

    def sample(self, n_samples: int, temperature=1.0, *args, **kwargs) -> Samples:
        """Draw ``n_samples``; at a relative ``temperature`` where the sampler supports it."""
        if isinstance(temperature, (int, float)) and temperature == 1.0:
            samples = self._sample(n_samples, *args, **kwargs)
        else:
            samples = self._sample_with_temperature(n_samples, temperature, *args, **kwargs)
        return unpack(self.return_hook(list(as_tuple(samples))))


class NormalDistribution(Energy, Sampler):
    """Multivariate normal distribution.

    Parameters
    ----------
    dim : int
        Dimension.
    mean : torch.Tensor, optional
        Mean vector ``[dim]`` (default zero).
    cov : torch.Tensor, optional
        Symmetric positive definite covariance ``[dim, dim]`` (default identity).

    Notes
    -----
    ``energy(x, temperature)`` is the negative log density of the distribution whose
    covariance is scaled by ``temperature``, normalisation included:
    ``0.5 |L^-1 (x - mean)|^2 / T + dim/2 log(2 pi T) + 1/2 log det cov``.
    """

    def __init__(self, dim: int, mean: torch.Tensor | None = None, cov: torch.Tensor | None = None):
        super().__init__(dim=dim)
        n = self.dim
        if mean is None:
            mean = torch.zeros(n)
        if mean.shape != (n,):
            raise ValueError(f"mean must have shape ({n},), got {tuple(mean.shape)}")
        self.register_buffer("_mean", mean.clone())
        self._has_cov = cov is not None
        if cov is not None:
            if cov.shape != (n, n):
                raise ValueError(f"cov must have shape ({n}, {n}), got {tuple(cov.shape)}")
            if not torch.allclose(cov, cov.T):
                raise ValueError("cov must be symmetric")
            try:
                chol = torch.linalg.cholesky(cov.to(mean.dtype))
            except RuntimeError:
                raise ValueError("cov must be positive definite") from None
            self.register_buffer("_chol", chol)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return self._neg_log_density(x, 1.0)

    def energy(self, x: torch.Tensor, temperature=1.0) -> torch.Tensor:
        self._check_inputs((x,))
        return self._neg_log_density(x, temperature)

    def _neg_log_density(self, x: torch.Tensor, temperature) -> torch.Tensor:
        r = x - self._mean
        log_det = 0.0
        if self._has_cov:
            r = torch.linalg.solve_triangular(self._chol, r.unsqueeze(-1), upper=False).squeeze(-1)
            log_det = torch.log(torch.diagonal(self._chol)).sum()
        t = torch.as_tensor(temperature, dtype=x.dtype, device=x.device)
        return (
            0.5 * r.pow(2).sum(-1, keepdim=True) / t
            + 0.5 * self.dim * torch.log(2 * math.pi * t)
            + log_det
        )

    def _sample_with_temperature(self, n_samples: int, temperature=1.0) -> torch.Tensor:
        eps = torch.randn(n_samples, self.dim, dtype=self._mean.dtype, device=self._mean.device)
        if self._has_cov:
            eps = eps @ self._chol.T
        scale = torch.as_tensor(temperature, dtype=eps.dtype, device=eps.device).sqrt()
        return self._mean + scale * eps

    def _sample(self, n_samples: int) -> torch.Tensor:
        return self._sample_with_temperature(n_samples, 1.0)


class DataSetSampler(Sampler):
    """Batches drawn from a data set, without replacement until it is exhausted.

    Parameters
    ----------
    *data : torch.Tensor
        One or more tensors of equal length.
    shuffle : bool
        Visit the data in a random order, reshuffled after every pass (default True).
    device, dtype : optional
        Where and as what the batches are returned (default: as the first tensor).
    generator : torch.Generator, optional
        Random source of the shuffling (default: torch's global one).

    Notes
    -----
    Unlike bgflow's, the order comes from torch's random number generator, so
    ``torch.manual_seed`` (or ``generator``) makes the batches reproducible and its state
    is saved with :meth:`state_dict`.
    """

    def __init__(
        self,
        *data: torch.Tensor,
        shuffle: bool = True,
        device=None,
        dtype=None,
        return_hook: Callable = lambda x: x,
        generator: torch.Generator | None = None,
    ):
        super().__init__(return_hook=return_hook)
        if not data:
            raise ValueError("DataSetSampler needs at least one tensor")
        if any(len(d) != len(data[0]) for d in data):
            raise ValueError(f"all data tensors must have the same length, got {[len(d) for d in data]}")
        if len(data[0]) == 0:
            raise ValueError("the data set is empty")
        self.data = list(data)
        self._device = device if device is not None else data[0].device
        self._dtype = dtype if dtype is not None else data[0].dtype
        self._shuffle = shuffle
        self._generator = generator
        self._order = self._new_order()
        self._position = 0

    def __len__(self) -> int:
        return len(self.data[0])

    def _new_order(self) -> torch.Tensor:
        if self._shuffle:
            return torch.randperm(len(self), generator=self._generator)
        return torch.arange(len(self))

    def _sample(self, n_samples: int) -> tuple:
        parts: list[torch.Tensor] = []
        needed = n_samples
        while needed > 0:
            take = self._order[self._position : self._position + needed]
            parts.append(take)
            needed -= len(take)
            self._position += len(take)
            if self._position >= len(self):
                self._order = self._new_order()
                self._position = 0
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return tuple(d[idx].to(device=self._device, dtype=self._dtype) for d in self.data)

    def reshuffle_(self) -> "DataSetSampler":
        """Start a new pass in a new random order."""
        self._order = self._new_order()
        self._position = 0
        return self

    def resize_(self, new_size: int) -> np.ndarray:
        """Resize the data set in place to ``new_size`` entries drawn with replacement.

        Growing repeats random entries, shrinking drops random ones (bgflow's behaviour);
        the data are then visited in a new order from the start. Resizing to the current
        size changes nothing.

        Parameters
        ----------
        new_size : int
            The new number of entries (positive).

        Returns
        -------
        np.ndarray
            The indices of the old entries that make up the new data set
            (``arange(len(self))`` when the size is unchanged).
        """
        if isinstance(new_size, bool) or not isinstance(new_size, (int, np.integer)) or new_size < 1:
            raise ValueError(f"new_size must be a positive integer, got {new_size!r}")
        if new_size == len(self):
            return np.arange(len(self))
        indices = torch.randint(len(self), (int(new_size),), generator=self._generator)
        self.data = [d[indices.to(d.device)] for d in self.data]
        self.reshuffle_()
        return indices.numpy()

    def get_extra_state(self) -> dict:
        return {"order": self._order.clone(), "position": self._position}

    def set_extra_state(self, state: dict) -> None:
        self._order = state["order"].clone()
        self._position = int(state["position"])
