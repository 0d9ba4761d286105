"""The host's ConditionalSplineTransformer follows bgflow's spline transformer.

A monotonic rational-quadratic spline maps ``[left, right)`` onto ``[bottom, top)``;
its knots come from ``params_net(x)``. It is invertible to round-off, its ``dlogp`` is
the log-determinant of its Jacobian, circular dimensions are periodic with a continuous
derivative, and it plugs into the host's ``CouplingFlow`` like bgflow's does into
bgflow's.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bgflow_gate.host.flows import CouplingFlow, MergeFlow, SequentialFlow, SplitFlow, SwapFlow
from bgflow_gate.host.splines import ConditionalSplineTransformer

BATCH = 5
N_COND = 3
N_BINS = 6

CIRCULARITIES = {
    "circular": True,
    "non-circular": False,
    "mixed": [True, False, True],
}
DOMAINS = {
    "unit": dict(left=0.0, right=1.0, bottom=0.0, top=1.0),
    "angle onto unit": dict(left=-math.pi, right=math.pi, bottom=0.0, top=1.0),
}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol=1e-8, rtol=0.0):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    tolerance = atol + rtol * expected.abs().max().item() if expected.numel() else atol
    assert error <= tolerance, f"max abs error {error:.3g} > tolerance {tolerance:.3g}"


def _n_noncircular(is_circular, dim: int) -> int:
    flags = torch.as_tensor(is_circular, dtype=torch.bool).expand(dim)
    return int((~flags).sum())


def _params_net(width: int, n_cond: int = N_COND, seed: int = 0) -> torch.nn.Module:
    """A small float64 network with outputs of order one (clearly non-trivial splines)."""
    generator = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(n_cond, 8), torch.nn.Tanh(), torch.nn.Linear(8, width)
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(1.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return net


def _spline(is_circular, dim: int = 3, n_bins: int = N_BINS, seed: int = 0, **domain):
    width = 3 * n_bins * dim + _n_noncircular(is_circular, dim)
    return ConditionalSplineTransformer(_params_net(width, seed=seed), is_circular, **domain)


def _inputs(dim: int = 3, low: float = 0.0, high: float = 1.0, batch: int = BATCH, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N_COND, generator=generator, dtype=torch.float64)
    y = low + (high - low) * torch.rand(batch, dim, generator=generator, dtype=torch.float64)
    return x, y


# --------------------------------------------------------------------------------------
# invertibility and log-determinant
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("circularity", CIRCULARITIES)
def test_forward_then_inverse_returns_the_input_and_the_negated_dlogp(circularity, domain):
    d = DOMAINS[domain]
    spline = _spline(CIRCULARITIES[circularity], **d)
    x, y = _inputs(low=d["left"], high=d["right"])

    z, dlogp = spline(x, y)
    y_back, dlogp_back = spline(x, z, inverse=True)

    assert dlogp.shape == (BATCH, 1)
    _assert_close(y_back, y, atol=1e-8)
    _assert_close(dlogp + dlogp_back, torch.zeros(BATCH, 1), atol=1e-10)
    assert (z - y).abs().max() > 1e-2  # the map is not trivially the identity


@pytest.mark.parametrize("circularity", CIRCULARITIES)
def test_inverse_then_forward_returns_the_input(circularity):
    d = DOMAINS["angle onto unit"]
    spline = _spline(CIRCULARITIES[circularity], **d)
    x, z = _inputs(low=d["bottom"], high=d["top"])

    y, _ = spline(x, z, inverse=True)
    z_back, _ = spline(x, y)

    _assert_close(z_back, z, atol=1e-8)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("circularity", CIRCULARITIES)
def test_dlogp_is_the_log_determinant_of_the_autograd_jacobian(circularity, inverse):
    d = DOMAINS["angle onto unit"]
    spline = _spline(CIRCULARITIES[circularity], **d)
    low, high = (d["bottom"], d["top"]) if inverse else (d["left"], d["right"])
    x, y = _inputs(low=low, high=high, batch=3)

    _, dlogp = spline(x, y, inverse=inverse)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda yi: spline(x[i : i + 1], yi, inverse=inverse)[0], y[i : i + 1]
        )[0, :, 0, :]
        _assert_close(dlogp[i, 0], torch.linalg.slogdet(jacobian)[1], atol=1e-9)


def test_extra_batch_dimensions_are_kept_and_dlogp_has_a_trailing_one():
    spline = _spline([True, False, True])
    x, y = _inputs(batch=6)
    z, dlogp = spline(x.reshape(2, 3, N_COND), y.reshape(2, 3, 3))
    z_flat, dlogp_flat = spline(x, y)

    assert dlogp.shape == (2, 3, 1)
    _assert_close(z.reshape(6, 3), z_flat, atol=1e-14)
    _assert_close(dlogp.reshape(6, 1), dlogp_flat, atol=1e-14)


# --------------------------------------------------------------------------------------
# domain, codomain and periodicity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("circularity", CIRCULARITIES)
def test_outputs_lie_in_the_codomain_including_for_boundary_inputs(circularity):
    d = DOMAINS["angle onto unit"]
    spline = _spline(CIRCULARITIES[circularity], **d)
    x, y = _inputs(low=d["left"], high=d["right"], batch=64)
    y[:2] = torch.tensor([d["left"], d["right"]], dtype=torch.float64)[:, None]
    y[2:4] = torch.tensor([d["left"] + 1e-15, d["right"] - 1e-15], dtype=torch.float64)[:, None]

    z, _ = spline(x, y)
    y_back, _ = spline(x, z, inverse=True)

    assert z.min() >= d["bottom"] and z.max() <= d["top"]
    assert y_back.min() >= d["left"] and y_back.max() <= d["right"]
    circular = torch.as_tensor(CIRCULARITIES[circularity]).expand(3)
    assert (z[:, circular] < d["top"]).all()  # circular outputs lie in [bottom, top)


def test_non_circular_end_points_map_onto_the_end_points():
    d = DOMAINS["angle onto unit"]
    spline = _spline(False, **d)
    x, _ = _inputs(batch=2)
    y = torch.tensor([[d["left"]] * 3, [d["right"]] * 3], dtype=torch.float64)

    z, _ = spline(x, y)

    _assert_close(z, torch.tensor([[d["bottom"]] * 3, [d["top"]] * 3]).double(), atol=1e-14)


def _value_and_slope(spline, x, y, inverse=False):
    """Output and derivative of a one-dimensional spline."""
    z, dlogp = spline(x, y, inverse=inverse)
    return z, torch.exp(dlogp)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_circular_maps_are_continuous_with_continuous_slope_across_the_boundary(inverse):
    domain = DOMAINS["angle onto unit"]
    net = _params_net(3 * N_BINS + 1)
    periodic = ConditionalSplineTransformer(lambda x: net(x)[..., :-1], True, **domain)
    open_ended = ConditionalSplineTransformer(net, False, **domain)
    (low, high), (out_low, out_high) = ((0.0, 1.0), (-math.pi, math.pi))
    if not inverse:
        (low, high), (out_low, out_high) = (out_low, out_high), (low, high)
    x, _ = _inputs(batch=4)
    at_low = torch.full((4, 1), low, dtype=torch.float64)
    near_high = torch.full((4, 1), high - 1e-9, dtype=torch.float64)

    z_low, slope_low = _value_and_slope(periodic, x, at_low, inverse)
    z_high, slope_high = _value_and_slope(periodic, x, near_high, inverse)

    _assert_close(z_low, torch.full((4, 1), out_low, dtype=torch.float64), atol=1e-14)
    _assert_close(z_high, torch.full((4, 1), out_high, dtype=torch.float64), atol=1e-7)
    _assert_close(slope_high, slope_low, rtol=1e-6, atol=0.0)
    secant = (out_high - out_low) / (high - low)
    assert (slope_low / secant - 1.0).abs().min() > 1e-2  # genuinely curved at the boundary
    # the same network with a separate last slope has a jump in slope at the boundary
    _, open_low = _value_and_slope(open_ended, x, at_low, inverse)
    _, open_high = _value_and_slope(open_ended, x, near_high, inverse)
    _assert_close(open_low, slope_low, atol=1e-12)
    assert ((open_high - open_low).abs() / open_low).min() > 1e-2


def test_circular_inputs_are_taken_modulo_the_period():
    d = DOMAINS["angle onto unit"]
    spline = _spline([True, False, True], **d)
    x, y = _inputs(low=d["left"], high=d["right"])
    shifted = y.clone()
    shifted[:, 0] += 2 * math.pi
    shifted[:, 2] -= 4 * math.pi

    z, dlogp = spline(x, y)
    z_shifted, dlogp_shifted = spline(x, shifted)

    _assert_close(z_shifted, z, atol=1e-12)
    _assert_close(dlogp_shifted, dlogp, atol=1e-10)
    at_right = torch.full((BATCH, 3), d["right"], dtype=torch.float64)
    at_left = torch.full((BATCH, 3), d["left"], dtype=torch.float64)
    _assert_close(spline(x, at_right)[0][:, [0, 2]], spline(x, at_left)[0][:, [0, 2]], atol=0)


def test_non_circular_inputs_outside_the_domain_warn_and_are_clamped():
    spline = _spline(False)
    x, y = _inputs()
    outside = y.clone()
    outside[0, 1] = 1.5
    outside[1, 2] = -0.5
    clamped = outside.clamp(0.0, 1.0)

    with pytest.warns(UserWarning, match=r"outside its domain \[0.0, 1.0\]"):
        z, dlogp = spline(x, outside)

    z_clamped, dlogp_clamped = spline(x, clamped)
    _assert_close(z, z_clamped, atol=0)
    _assert_close(dlogp, dlogp_clamped, atol=0)


def test_zero_parameters_give_the_affine_map_of_the_domain_onto_the_codomain():
    d = DOMAINS["angle onto unit"]
    spline = ConditionalSplineTransformer(
        lambda x: torch.zeros(*x.shape[:-1], 3 * N_BINS * 2 + 2, dtype=x.dtype), **d
    )
    x, y = _inputs(dim=2, low=d["left"], high=d["right"])

    z, dlogp = spline(x, y)

    _assert_close(z, (y + math.pi) / (2 * math.pi), atol=1e-12)
    _assert_close(dlogp, torch.full((BATCH, 1), -2 * math.log(2 * math.pi), dtype=torch.float64), atol=1e-12)


def test_is_circular_accepts_a_bool_a_list_and_a_tensor():
    x, y = _inputs()
    width = 3 * N_BINS * 3
    net = _params_net(width)
    outputs = [
        ConditionalSplineTransformer(net, flags)(x, y)
        for flags in (True, [True, True, True], torch.tensor([True, True, True]))
    ]
    for z, dlogp in outputs[1:]:
        _assert_close(z, outputs[0][0], atol=0)
        _assert_close(dlogp, outputs[0][1], atol=0)


# --------------------------------------------------------------------------------------
# inside the host's coupling flows, and training
# --------------------------------------------------------------------------------------


def _coupling_spline(n_cond: int, dim: int, is_circular, seed: int):
    width = 3 * N_BINS * dim + _n_noncircular(is_circular, dim)
    return ConditionalSplineTransformer(_params_net(width, n_cond=n_cond, seed=seed), is_circular)


def _spline_flow() -> SequentialFlow:
    return SequentialFlow(
        [
            SplitFlow(2),
            CouplingFlow(_coupling_spline(2, 2, [True, False], seed=3)),
            SwapFlow(),
            CouplingFlow(_coupling_spline(2, 2, True, seed=4)),
            SwapFlow(),
            MergeFlow(2),
        ]
    )


def test_a_coupling_flow_of_splines_is_invertible_with_exact_log_det():
    flow = _spline_flow()
    generator = torch.Generator().manual_seed(5)
    y = torch.rand(BATCH, 4, generator=generator, dtype=torch.float64)

    z, dlogp = flow(y)
    y_back, dlogp_back = flow(z, inverse=True)

    assert z.shape == (BATCH, 4) and dlogp.shape == (BATCH, 1)
    _assert_close(y_back, y, atol=1e-8)
    _assert_close(dlogp + dlogp_back, torch.zeros(BATCH, 1), atol=1e-10)
    for i in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda yi: flow(yi)[0], y[i : i + 1])
        _assert_close(dlogp[i, 0], torch.linalg.slogdet(jacobian[0, :, 0, :])[1], atol=1e-9)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradients_reach_every_params_net_parameter(inverse):
    spline = _spline([True, False, True])
    x, y = _inputs()

    z, dlogp = spline(x, y, inverse=inverse)
    (z.square().sum() + dlogp.sum()).backward()

    for name, p in spline.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_a_params_net_of_the_wrong_width_raises_a_value_error_naming_the_expected_width():
    # two dimensions, one non-circular: 3 * n_bins * 2 + 1 outputs (7, 13, ..., 49)
    spline = ConditionalSplineTransformer(_params_net(3 * N_BINS * 2 + 2), [True, False])
    x, y = _inputs(dim=2)

    with pytest.raises(ValueError, match=r"returned 38 values.*3 \* n_bins \* 2 \+ 1") as info:
        spline(x, y)
    assert "7, 13, 49" in str(info.value)


def test_is_circular_of_the_wrong_length_raises_a_value_error():
    spline = ConditionalSplineTransformer(_params_net(3 * N_BINS * 2 + 1), [True, False, True])
    x, y = _inputs(dim=2)

    with pytest.raises(ValueError, match="is_circular has 3 entries.*2 dimension"):
        spline(x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(left=1.0, right=0.0), "left must be smaller than right"),
        (dict(bottom=0.0, top=0.0), "bottom must be smaller than top"),
        (dict(is_circular=[[True]]), "one-dimensional"),
    ],
)
def test_invalid_construction_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConditionalSplineTransformer(_params_net(3), **kwargs)


# --------------------------------------------------------------------------------------
# against real bgflow
# --------------------------------------------------------------------------------------


def _real_bgflow_spline():
    try:
        import bgflow
        import nflows  # noqa: F401  (bgflow's spline transformer needs it)
    except Exception as error:  # pragma: no cover - depends on the environment
        pytest.skip(f"real bgflow with nflows is not importable: {error}")
    return bgflow.ConditionalSplineTransformer


@pytest.mark.bgflow
@pytest.mark.parametrize(
    "is_circular",
    [True, False, [True, False]],
    ids=["circular", "non-circular", "mixed"],
)
@pytest.mark.parametrize("domain", [(0.0, 1.0), (-math.pi, math.pi)], ids=["unit", "angle"])
def test_the_same_params_net_gives_the_same_map_as_bgflow(is_circular, domain):
    # bgflow's mixed case reads as many extra slopes as there are circular dimensions,
    # so the comparison uses one circular and one non-circular dimension; its forward
    # map is only consistent when [left, right] == [bottom, top].
    bgflow_spline = _real_bgflow_spline()
    low, high = domain
    d = dict(left=low, right=high, bottom=low, top=high)
    net = _params_net(3 * N_BINS * 2 + _n_noncircular(is_circular, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bgflow warns about nflows without identity init
        theirs = bgflow_spline(net, torch.as_tensor(is_circular), **d)
    ours = ConditionalSplineTransformer(net, is_circular, **d)
    ours._default_settings.update(
        enable_identity_init=theirs._default_settings.get("enable_identity_init", False)
    )
    x, y = _inputs(dim=2, low=low, high=high, batch=32)

    for inverse in (False, True):
        z_ours, dlogp_ours = ours(x, y, inverse=inverse)
        z_theirs, dlogp_theirs = theirs(x, y, inverse=inverse)
        _assert_close(z_ours, z_theirs, atol=1e-9)
        _assert_close(dlogp_ours, dlogp_theirs, atol=1e-9)
