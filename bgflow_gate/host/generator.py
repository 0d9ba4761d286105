"""``BoltzmannGenerator`` and importance weights, with bgflow's conventions.

A Boltzmann generator pushes prior samples ``z`` through a flow to ``x``; the flow returns
``dlogp = log|det dx/dz|``, so the generator's negative log density at ``x`` is
``u_prior(z) + dlogp`` and its reverse-KL loss per sample is ``u_target(x) - dlogp``.
"""

from __future__ import annotations


import torch

from .distributions import Sampler, as_tuple, unpack
from .energy import Energy

__all__ = [
    "BoltzmannGenerator",
    "log_weights",
    "log_weights_given_latent",
    "effective_sample_size",
    "sampling_efficiency",
]


def log_weights_given_latent(x, z, dlogp, prior, target, temperature=1.0, normalize=True) -> torch.Tensor:
    """Log importance weights ``u_prior(z) + dlogp - u_target(x)``, shape ``[n]``.

    With ``normalize`` the weights are divided by their sum (log-sum-exp subtracted).
    """
    logw = (
        prior.energy(*as_tuple(z), temperature=temperature)
        + dlogp
        - target.energy(*as_tuple(x), temperature=temperature)
    )
    if normalize:
        logw = logw - torch.logsumexp(logw, dim=0)
    return logw.view(-1)


def log_weights(*x, prior, flow, target, temperature=1.0, normalize=True) -> torch.Tensor:
    """Log importance weights of samples ``x``, mapped back through the flow."""
    *z, neg_dlogp = flow(*x, inverse=True, temperature=temperature)
    return log_weights_given_latent(x, z, -neg_dlogp, prior, target, temperature, normalize)


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size ``(sum w)^2 / sum w^2``; the weights need not be normalised."""
    return torch.exp(2 * torch.logsumexp(log_weights, dim=0) - torch.logsumexp(2 * log_weights, dim=0))


def sampling_efficiency(log_weights: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size divided by the number of samples, in (0, 1]."""
    return effective_sample_size(log_weights) / len(log_weights)


class BoltzmannGenerator(Energy, Sampler):
    """A normalizing flow from a prior to (an approximation of) a target distribution.

    Parameters
    ----------
    prior : Energy and Sampler
        The latent distribution (``sample`` and ``energy``).
    flow : Flow
        Maps latent to configuration space: ``flow(*z) -> (*x, dlogp)``.
    target : Energy, optional
        The target energy (reduced units), used by ``kldiv`` and the weights.
    """

    def __init__(self, prior, flow, target: Energy | None):
        shapes = target.event_shapes if target is not None else prior.event_shapes
        super().__init__([list(s) for s in shapes] if len(shapes) > 1 else list(shapes[0]))
        self._prior = prior
        self._flow = flow
        self._target = target

    @property
    def prior(self):
        return self._prior

    @property
    def flow(self):
        return self._flow

    def sample(
        self,
        n_samples: int,
        temperature=1.0,
        with_latent: bool = False,
        with_dlogp: bool = False,
        with_energy: bool = False,
        with_log_weights: bool = False,
        with_weights: bool = False,
    ):
        """Draw samples; the flags append, in this order, the latent sample, ``dlogp``, the
        generator's energy ``u_prior(z) + dlogp``, the log weights and the normalised weights.

        Returns the samples alone when no flag is set, otherwise a tuple.
        """
        z = as_tuple(self._prior.sample(n_samples, temperature=temperature))
        *x, dlogp = self._flow(*z, temperature=temperature)
        results = list(x)
        if with_latent:
            results.extend(z)
        if with_dlogp:
            results.append(dlogp)
        if with_energy or with_log_weights or with_weights:
            own_energy = self._prior.energy(*z, temperature=temperature) + dlogp
            if with_energy:
                results.append(own_energy)
            if with_log_weights or with_weights:
                logw = own_energy - self._target.energy(*x, temperature=temperature)
                if with_log_weights:
                    results.append(logw)
                if with_weights:
                    results.append(torch.softmax(logw, dim=0).view(-1))
        return unpack(results)

    def energy(self, *x, temperature=1.0) -> torch.Tensor:
        """Negative log likelihood of ``x`` under the generator (up to the prior's constant)."""
        *z, neg_dlogp = self._flow(*x, inverse=True, temperature=temperature)
        return self._prior.energy(*z, temperature=temperature) - neg_dlogp

    def kldiv(self, n_samples: int, temperature=1.0) -> torch.Tensor:
        """Per-sample reverse-KL loss ``u_target(x) - dlogp`` of fresh samples, ``[n, 1]``."""
        z = as_tuple(self._prior.sample(n_samples, temperature=temperature))
        *x, dlogp = self._flow(*z, temperature=temperature)
        return self._target.energy(*x, temperature=temperature) - dlogp

    def log_weights(self, *x, temperature=1.0, normalize=True) -> torch.Tensor:
        """Log importance weights of samples ``x``."""
        return log_weights(
            *x, prior=self._prior, flow=self._flow, target=self._target,
            temperature=temperature, normalize=normalize,
        )

    def log_weights_given_latent(self, x, z, dlogp, temperature=1.0, normalize=True) -> torch.Tensor:
        """Log importance weights when the latent samples and ``dlogp`` are known."""
        return log_weights_given_latent(x, z, dlogp, self._prior, self._target, temperature, normalize)
