"""Neural-network building blocks of the host, following bgflow's ``bgflow.nn``.

Only :class:`DenseNet`, the multi-layer perceptron that bgflow scripts use as the
conditioner of coupling layers, is provided.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .energy import _is_int

__all__ = ["DenseNet"]

Activation = torch.nn.Module | Sequence[torch.nn.Module | None] | None


def _check_units(n_units: Sequence[int]) -> list[int]:
    if not isinstance(n_units, Sequence) or isinstance(n_units, str):
        raise ValueError(f"n_units must be a list of layer widths; got {n_units!r}")
    units = list(n_units)
    if len(units) < 2 or not all(_is_int(n) and n > 0 for n in units):
        raise ValueError(
            "n_units must list at least two positive integers (input width, ..., output "
            f"width); got {n_units!r}"
        )
    return units


def _is_activation_list(activation: Activation) -> bool:
    return isinstance(activation, (list, tuple, torch.nn.ModuleList))


def _hidden_activations(activation: Activation, n_hidden: int) -> list:
    """One activation (or ``None``) per hidden layer."""
    if _is_activation_list(activation):
        activations = list(activation)
        if len(activations) != n_hidden:
            raise ValueError(
                f"a list of activations needs one entry per hidden layer: the network has "
                f"{n_hidden} hidden layer(s) but {len(activations)} activation(s) were given"
            )
        return activations
    return [activation] * n_hidden


class DenseNet(torch.nn.Module):
    """A fully connected network (multi-layer perceptron).

    Parameters
    ----------
    n_units : sequence of int
        Widths of all layers, input first and output last: ``[d_in, h1, ..., d_out]``.
        The network has ``len(n_units) - 1`` linear layers and ``len(n_units) - 2``
        hidden layers.
    activation : torch.nn.Module or sequence of torch.nn.Module, optional
        Non-linearity after each hidden layer. A single module is applied after every
        hidden layer; a list gives one module per hidden layer (``None`` entries mean no
        non-linearity there). ``None`` gives a purely linear network. Nothing is applied
        after the output layer.
    weight_scale : float
        Factor by which the default initial weights of every linear layer are multiplied.
    bias_scale : float
        If positive, every bias is initialised uniformly in ``[0, bias_scale)``;
        otherwise PyTorch's default bias initialisation is kept.

    Raises
    ------
    ValueError
        If ``n_units`` has fewer than two entries, or ``activation`` is a list whose
        length is not the number of hidden layers.

    Examples
    --------
    >>> net = DenseNet([2, 8, 8, 3], activation=torch.nn.Tanh())
    >>> net(torch.zeros(5, 2)).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        n_units: Sequence[int],
        activation: Activation = None,
        weight_scale: float = 1.0,
        bias_scale: float = 0.0,
    ):
        super().__init__()
        units = _check_units(n_units)
        activations = _hidden_activations(activation, len(units) - 2)
        layers: list[torch.nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(units[:-1], units[1:])):
            layers.append(self._make_linear(width_in, width_out, weight_scale, bias_scale))
            is_hidden = i < len(activations)
            if is_hidden and activations[i] is not None:
                layers.append(activations[i])
        self._layers = torch.nn.Sequential(*layers)

    @staticmethod
    def _make_linear(
        width_in: int, width_out: int, weight_scale: float, bias_scale: float
    ) -> torch.nn.Linear:
        linear = torch.nn.Linear(width_in, width_out)
        with torch.no_grad():
            linear.weight.mul_(weight_scale)
            if bias_scale > 0.0:
                linear.bias.uniform_(0.0, bias_scale)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network to ``x`` of shape ``[..., n_units[0]]``."""
        return self._layers(x)
