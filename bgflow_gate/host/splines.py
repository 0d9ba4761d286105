"""Rational-quadratic spline transformer of the host, following bgflow's
``bgflow.nn.flow.transformer.spline``.

The spline itself (locating the bin, evaluating the rational-quadratic map, inverting
it by solving the quadratic, and its log-derivative) is zuko's
:class:`zuko.transforms.MonotonicRQSTransform`. This module adds what bgflow's
transformer adds around it: the conditioning through ``params_net``, the layout of the
network output, the constraints that turn raw network outputs into knots and slopes,
the mapping of ``[left, right]`` onto ``[bottom, top]``, and periodic (circular)
dimensions.

Examples
--------
>>> import torch
>>> # zero spline parameters give the identity (one dimension, 4 bins: 3 * 4 + 1 outputs)
>>> params_net = lambda x: torch.zeros(*x.shape[:-1], 13)
>>> spline = ConditionalSplineTransformer(params_net)
>>> x, y = torch.zeros(2, 1), torch.tensor([[0.25], [0.5]])
>>> y_out, dlogp = spline(x, y)
>>> torch.allclose(y_out, y), torch.allclose(dlogp, torch.zeros(2, 1), atol=1e-6)
(True, True)
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.distributions import Transform as _TorchTransform
from zuko.transforms import MonotonicRQSTransform

from .flows import Transformer

__all__ = ["ConditionalSplineTransformer"]

DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


class _KnotSpline(MonotonicRQSTransform):
    """zuko's monotonic rational-quadratic spline, built from explicit knots.

    zuko's own constructor derives the knots from unconstrained parameters with its
    own conventions (a symmetric interval ``[-B, B]`` and unit slopes at both ends).
    Here the knots and all ``K + 1`` knot slopes are given directly; evaluation,
    inversion and the log-derivative are zuko's.

    Parameters
    ----------
    horizontal : torch.Tensor
        Increasing knot positions on the spline's input axis, shape ``[..., K + 1]``.
    vertical : torch.Tensor
        Increasing knot positions on the spline's output axis, shape ``[..., K + 1]``.
    derivatives : torch.Tensor
        Positive slopes of the spline at the knots, shape ``[..., K + 1]``.
    """

    def __init__(
        self, horizontal: torch.Tensor, vertical: torch.Tensor, derivatives: torch.Tensor
    ):
        _TorchTransform.__init__(self)
        self.horizontal = horizontal
        self.vertical = vertical
        self.derivatives = derivatives

    @staticmethod
    def searchsorted(seq: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """One plus the index of the bin holding ``value`` (zuko subtracts the one).

        Unlike zuko's lookup, a value exactly on the first knot belongs to the first bin
        (zuko treats it as outside the spline and returns it unchanged), and values
        beyond the end knots are assigned to the end bins instead of being passed
        through; the transformer keeps its inputs within the knots anyway.
        """
        return torch.sum(seq[..., 1:-1] < value[..., None], dim=-1) + 1


def _knots(raw: torch.Tensor, low: float, high: float, min_fraction: float) -> torch.Tensor:
    """Knots ``low = k_0 < k_1 < ... < k_K = high`` from unnormalised bin sizes.

    Each bin gets at least ``min_fraction`` of the interval; the rest is shared out by a
    softmax over the last dimension of ``raw`` (``[..., K]``).
    """
    n_bins = raw.shape[-1]
    fractions = min_fraction + (1.0 - min_fraction * n_bins) * torch.softmax(raw, dim=-1)
    inner = (high - low) * torch.cumsum(fractions[..., :-1], dim=-1) + low
    first = inner.new_full((*inner.shape[:-1], 1), low)
    last = inner.new_full((*inner.shape[:-1], 1), high)
    return torch.cat([first, inner, last], dim=-1)


def _wrap(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map values into ``[low, high)`` modulo ``high - low``; values already there are
    returned bit for bit."""
    period = high - low
    wrapped = torch.remainder(values - low, period) + low
    wrapped = torch.where(wrapped >= high, wrapped - period, wrapped)
    outside = (values < low) | (values >= high)
    return torch.where(outside, wrapped, values)


def _check_interval(name_low: str, low: float, name_high: str, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"{name_low} must be smaller than {name_high} and both finite; "
            f"got {name_low}={low!r}, {name_high}={high!r}"
        )


class ConditionalSplineTransformer(Transformer):
    """Monotonic rational-quadratic spline transformer (neural spline flow).

    Transforms each entry of ``y`` in ``[left, right)`` into ``[bottom, top)`` with a
    monotonic rational-quadratic spline of ``n_bins`` bins whose knots and slopes are
    computed from the conditioner input ``x`` by ``params_net``.

    Parameters
    ----------
    params_net : callable
        Network mapping the conditioner input ``x`` (shape ``[*batch, n_cond]``) to the
        spline parameters, shape ``[*batch, 3 * n_bins * dim + n_noncircular]`` where
        ``dim = y.shape[-1]`` and ``n_noncircular`` is the number of non-circular
        transformed dimensions. ``n_bins`` is inferred from this width. The output is
        read as four consecutive blocks, each dimension-major (the ``n_bins`` values of
        dimension 0 first, then those of dimension 1, ...):

        1. ``n_bins * dim`` unnormalised bin widths on the output interval
           ``[bottom, top]``;
        2. ``n_bins * dim`` unnormalised bin widths on the input interval
           ``[left, right]``;
        3. ``n_bins * dim`` unnormalised slopes at knots ``0 .. n_bins - 1``;
        4. ``n_noncircular`` unnormalised slopes at the last knot of the non-circular
           dimensions, in increasing dimension order. For circular dimensions the last
           knot reuses the slope of the first one, so the map is periodic.

        Bin widths pass through a softmax with a floor of ``min_bin_width`` (resp.
        ``min_bin_height``) of the interval; slopes through ``min_derivative +
        softplus``, in units of ``(right - left) / (top - bottom)``. As in bgflow, the
        forward map is the inverse of the spline drawn through these knots from the
        output interval to the input interval, so the slopes are
        ``d(input)/d(output)`` at the knots. All-zero parameters give the affine map of
        ``[left, right]`` onto ``[bottom, top]`` (the identity when the two intervals
        coincide) while ``enable_identity_init`` is on (the default).
    is_circular : bool or sequence of bool or torch.Tensor
        ``True`` treats all transformed dimensions as periodic (angles): inputs are taken
        modulo ``right - left``, outputs modulo ``top - bottom``, and the spline has the
        same slope at both ends, so the map and its derivative are continuous across
        the periodic boundary. A boolean tensor or sequence of length ``dim`` marks the
        circular dimensions individually.
    left, right : float
        The input interval of the forward map.
    bottom, top : float
        The output interval of the forward map.

    Attributes
    ----------
    _default_settings : dict
        ``min_bin_width``, ``min_bin_height``, ``min_derivative`` (each ``1e-3``) and
        ``enable_identity_init`` (``True``: the slope activation is a softplus scaled so
        that a raw slope of zero gives slope one; ``False``: a plain softplus, as with
        nflows versions that lack this option). Read at every call; bgflow's factory
        switches ``enable_identity_init`` off the same way.

    Raises
    ------
    ValueError
        At construction, if an interval is empty or not finite, or ``is_circular`` has
        more than one dimension. When called, if ``is_circular`` does not match
        ``y.shape[-1]``, the ``params_net`` output width is not ``3 * n_bins * dim +
        n_noncircular`` for a positive integer ``n_bins``, or ``n_bins`` is too large for
        the minimal bin sizes.

    Warns
    -----
    UserWarning
        When a non-circular input lies outside its interval; it is clamped to the
        interval (as bgflow does).

    Notes
    -----
    The domain of a non-circular dimension is the closed interval; there are no
    identity tails outside it. ``_forward(x, y)`` and ``_inverse(x, y)`` return
    ``(y', dlogp)`` with ``dlogp = log|det dy'/dy|`` summed over the transformed
    dimensions, shape ``[*batch, 1]``. Extra positional conditioner inputs and keyword
    arguments are accepted and ignored, as in bgflow: ``params_net`` sees only ``x``.

    References
    ----------
    C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, Neural Spline Flows, NeurIPS 2019,
    https://arxiv.org/abs/1906.04032.
    """

    def __init__(
        self,
        params_net: Callable[[torch.Tensor], torch.Tensor],
        is_circular: bool | Sequence[bool] | torch.Tensor = False,
        left: float = 0.0,
        right: float = 1.0,
        bottom: float = 0.0,
        top: float = 1.0,
    ):
        super().__init__()
        _check_interval("left", left, "right", right)
        _check_interval("bottom", bottom, "top", top)
        circular = torch.as_tensor(is_circular, dtype=torch.bool)
        if circular.dim() > 1:
            raise ValueError(
                "is_circular must be a bool or a one-dimensional sequence of bools; "
                f"got shape {tuple(circular.shape)}"
            )
        self._params_net = params_net
        self.register_buffer("_is_circular", circular, persistent=False)
        self._left = float(left)
        self._right = float(right)
        self._bottom = float(bottom)
        self._top = float(top)
        self._default_settings = {
            "min_bin_width": DEFAULT_MIN_BIN_WIDTH,
            "min_bin_height": DEFAULT_MIN_BIN_HEIGHT,
            "min_derivative": DEFAULT_MIN_DERIVATIVE,
            "enable_identity_init": True,
        }

    # ----------------------------------------------------------------------------------
    # parameters
    # ----------------------------------------------------------------------------------

    def _circular_mask(self, dim: int) -> torch.Tensor:
        """``[dim]`` boolean tensor, ``True`` for the circular dimensions."""
        if self._is_circular.dim() == 0:
            return self._is_circular.expand(dim)
        if self._is_circular.shape[0] != dim:
            raise ValueError(
                f"is_circular has {self._is_circular.shape[0]} entries, but the transformed "
                f"input has {dim} dimension(s)"
            )
        return self._is_circular

    def _n_bins(self, width: int, dim: int, n_noncircular: int) -> int:
        if dim < 1:
            raise ValueError("the transformed input must have at least one dimension")
        n_bins, remainder = divmod(width - n_noncircular, 3 * dim)
        if n_bins < 1 or remainder != 0:
            examples = ", ".join(str(3 * k * dim + n_noncircular) for k in (1, 2, 8))
            raise ValueError(
                f"params_net returned {width} values per sample, but a spline over {dim} "
                f"transformed dimension(s), {n_noncircular} of them non-circular, expects "
                f"a width of 3 * n_bins * {dim} + {n_noncircular} for a positive integer "
                f"n_bins (e.g. {examples} for 1, 2, 8 bins)"
            )
        settings = self._default_settings
        largest = min(1.0 / settings["min_bin_width"], 1.0 / settings["min_bin_height"])
        if n_bins > largest:
            raise ValueError(
                f"{n_bins} bins are too many for the minimal bin sizes "
                f"(min_bin_width={settings['min_bin_width']}, "
                f"min_bin_height={settings['min_bin_height']}): at most {int(largest)}"
            )
        return n_bins

    def _spline(self, x: torch.Tensor, y: torch.Tensor) -> tuple[_KnotSpline, torch.Tensor]:
        """The spline from the output interval to the input interval, for conditioner
        ``x``, and the ``[dim]`` circular mask."""
        dim = y.shape[-1]
        circular = self._circular_mask(dim).to(y.device)
        noncircular_index = torch.nonzero(~circular).flatten()
        n_noncircular = noncircular_index.numel()
        params = self._params_net(x)
        batch_shape = params.shape[:-1]
        n_bins = self._n_bins(params.shape[-1], dim, n_noncircular)
        raw_out, raw_in, raw_slopes, raw_last = torch.split(
            params, [n_bins * dim] * 3 + [n_noncircular], dim=-1
        )
        raw_out = raw_out.reshape(*batch_shape, dim, n_bins)
        raw_in = raw_in.reshape(*batch_shape, dim, n_bins)
        raw_slopes = raw_slopes.reshape(*batch_shape, dim, n_bins)
        # the last knot's slope: the first one's (periodic) unless given separately
        raw_end = raw_slopes[..., 0].index_copy(-1, noncircular_index, raw_last)
        raw_slopes = torch.cat([raw_slopes, raw_end[..., None]], dim=-1)

        settings = self._default_settings
        min_slope = settings["min_derivative"]
        beta = math.log(2.0) / (1.0 - min_slope) if settings["enable_identity_init"] else 1.0
        # slopes are relative to the secant of the whole interval, so that the spline's
        # shape does not depend on the lengths of [left, right] and [bottom, top]
        scale = (self._right - self._left) / (self._top - self._bottom)
        slopes = scale * (min_slope + F.softplus(raw_slopes, beta=beta))
        out_knots = _knots(raw_out, self._bottom, self._top, settings["min_bin_width"])
        in_knots = _knots(raw_in, self._left, self._right, settings["min_bin_height"])
        return _KnotSpline(out_knots, in_knots, slopes), circular

    # ----------------------------------------------------------------------------------
    # domain handling
    # ----------------------------------------------------------------------------------

    @staticmethod
    def _into_domain(
        y: torch.Tensor, circular: torch.Tensor, low: float, high: float
    ) -> torch.Tensor:
        """Wrap circular entries into ``[low, high)``; clamp non-circular entries into
        ``[low, high]`` with a warning if any lies outside."""
        outside = ((y < low) | (y > high)) & ~circular
        if bool(outside.any()):
            warnings.warn(
                f"ConditionalSplineTransformer: non-circular input outside its domain "
                f"[{low}, {high}] (min {y.min().item()}, max {y.max().item()}); "
                f"clamping it to the domain",
                UserWarning,
            )
        return torch.where(circular, _wrap(y, low, high), y.clamp(low, high))

    @staticmethod
    def _onto_codomain(
        y: torch.Tensor, circular: torch.Tensor, low: float, high: float
    ) -> torch.Tensor:
        """Remove round-off beyond the codomain: circular entries into ``[low, high)``,
        others into ``[low, high]``."""
        return torch.where(circular, _wrap(y, low, high), y.clamp(low, high))

    # ----------------------------------------------------------------------------------
    # the two directions
    # ----------------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, y: torch.Tensor, *cond: torch.Tensor, **kwargs):
        spline, circular = self._spline(x, y)
        y = self._into_domain(y, circular, self._left, self._right)
        out = spline.inv(y)
        _, ladj = spline.call_and_ladj(out)
        out = self._onto_codomain(out, circular, self._bottom, self._top)
        return out, -ladj.sum(dim=-1, keepdim=True)

    def _inverse(self, x: torch.Tensor, y: torch.Tensor, *cond: torch.Tensor, **kwargs):
        spline, circular = self._spline(x, y)
        y = self._into_domain(y, circular, self._bottom, self._top)
        out, ladj = spline.call_and_ladj(y)
        out = self._onto_codomain(out, circular, self._left, self._right)
        return out, ladj.sum(dim=-1, keepdim=True)
