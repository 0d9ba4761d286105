"""The built-in host's flows and DenseNet follow bgflow's conventions.

Every flow returns ``(*ys, dlogp)`` with ``dlogp`` shaped ``[batch, 1]`` and equal to
``log|det J|`` of the map computed; inverting returns the input and the negated dlogp.
"""

from __future__ import annotations

import math

import pytest
import torch

from bgflow_gate.host.flows import (
    AffineTransformer,
    CouplingFlow,
    Flow,
    InverseFlow,
    MergeFlow,
    SequentialFlow,
    SplitFlow,
    SwapFlow,
    Transformer,
)
from bgflow_gate.host.nn import DenseNet

BATCH = 3


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol=1e-6, rtol=1e-6):
    """Like torch.testing.assert_close (which costs ~0.5 s to import on first use)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    tolerance = atol + rtol * expected.abs().max().item() if expected.numel() else atol
    assert error <= tolerance, f"max abs error {error:.3g} > tolerance {tolerance:.3g}"


def _net(n_in: int, n_out: int) -> DenseNet:
    return DenseNet([n_in, 6, n_out], activation=torch.nn.Tanh(), bias_scale=0.5)


def _affine(n_cond: int, n_out: int, shift=True, scale=True, **kwargs) -> AffineTransformer:
    return AffineTransformer(
        shift_transformation=_net(n_cond, n_out) if shift else None,
        scale_transformation=_net(n_cond, n_out) if scale else None,
        init_downscale=0.0,
        **kwargs,
    )


def _inputs(*widths: int, low: float = -1.0, high: float = 1.0):
    return tuple(low + (high - low) * torch.rand(BATCH, w, dtype=torch.float64) for w in widths)


def _realnvp_block():
    return SequentialFlow(
        [
            SplitFlow(2),
            CouplingFlow(_affine(2, 2)),
            SwapFlow(),
            CouplingFlow(_affine(2, 2)),
            MergeFlow(2),
        ]
    )


# name -> () -> (flow, inputs); the flows are built in float64 with a fixed seed.
CASES = {
    "SequentialFlow of couplings": lambda: (_realnvp_block(), _inputs(4)),
    "empty SequentialFlow": lambda: (SequentialFlow([]), _inputs(4)),
    "SplitFlow by sizes (last inferred)": lambda: (SplitFlow(1, 2), _inputs(4)),
    "SplitFlow by indices": lambda: (SplitFlow([3, 0], [2], [1]), _inputs(4)),
    "MergeFlow": lambda: (MergeFlow(1, 3), _inputs(1, 3)),
    "MergeFlow by indices": lambda: (MergeFlow([1, 3], [0, 2]), _inputs(2, 2)),
    "SwapFlow": lambda: (SwapFlow(), _inputs(1, 3)),
    "InverseFlow of a coupling": lambda: (InverseFlow(CouplingFlow(_affine(2, 2))), _inputs(2, 2)),
    "CouplingFlow affine": lambda: (CouplingFlow(_affine(2, 2)), _inputs(2, 2)),
    "CouplingFlow several transformed inputs": lambda: (
        CouplingFlow(_affine(1, 3), transformed_indices=(0, 2), cond_indices=(1,)),
        _inputs(1, 1, 2),
    ),
    "CouplingFlow shift only": lambda: (CouplingFlow(_affine(2, 2, scale=False)), _inputs(2, 2)),
    "CouplingFlow scale only": lambda: (CouplingFlow(_affine(2, 2, shift=False)), _inputs(2, 2)),
    "CouplingFlow volume preserving": lambda: (
        CouplingFlow(_affine(2, 2, preserve_volume=True)),
        _inputs(2, 2),
    ),
    "CouplingFlow circular": lambda: (
        CouplingFlow(_affine(2, 2, scale=False, is_circular=True)),
        _inputs(2, 2, low=0.0, high=1.0),
    ),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    torch.manual_seed(0)
    flow, xs = CASES[request.param]()
    return flow.double(), xs


def _full_jacobian(flow: Flow, xs, inverse: bool = False) -> torch.Tensor:
    """Jacobian of all outputs (concatenated) w.r.t. all inputs (concatenated), one
    square matrix per sample."""
    widths = [x.shape[-1] for x in xs]

    def one_sample(flat: torch.Tensor) -> torch.Tensor:
        pieces = [p.unsqueeze(0) for p in torch.split(flat, widths)]
        *ys, _ = flow(*pieces, inverse=inverse)
        return torch.cat(ys, dim=-1).squeeze(0)

    flat = torch.cat(xs, dim=-1)
    return torch.stack(
        [torch.autograd.functional.jacobian(one_sample, flat[b]) for b in range(len(flat))]
    )


# --------------------------------------------------------------------------------------
# properties every flow has
# --------------------------------------------------------------------------------------


def test_inverse_of_forward_returns_the_input(case):
    flow, xs = case
    *ys, _ = flow(*xs)
    *back, _ = flow(*ys, inverse=True)
    assert len(back) == len(xs)
    for b, x in zip(back, xs):
        _assert_close(b, x, atol=1e-10, rtol=0)


def test_forward_and_inverse_dlogp_add_up_to_zero(case):
    flow, xs = case
    *ys, dlogp_forward = flow(*xs)
    *_, dlogp_inverse = flow(*ys, inverse=True)
    zeros = torch.zeros(BATCH, 1, dtype=torch.float64)
    _assert_close(dlogp_forward + dlogp_inverse, zeros, atol=1e-10, rtol=0)


def test_dlogp_has_shape_batch_by_one(case):
    flow, xs = case
    *ys, dlogp = flow(*xs)
    assert dlogp.shape == (BATCH, 1)
    assert flow(*ys, inverse=True)[-1].shape == (BATCH, 1)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_dlogp_is_log_abs_det_of_the_autograd_jacobian(case, inverse):
    flow, xs = case
    if inverse:  # evaluate the inverse at points in the image of the forward map
        *xs, _ = flow(*xs)
    *_, dlogp = flow(*xs, inverse=inverse)
    jac = _full_jacobian(flow, xs, inverse=inverse)
    assert jac.shape == (BATCH, sum(x.shape[-1] for x in xs), sum(x.shape[-1] for x in xs))
    expected = torch.linalg.slogdet(jac).logabsdet.unsqueeze(-1)
    _assert_close(dlogp, expected, atol=1e-10, rtol=0)


def test_the_coupling_cases_are_not_trivially_volume_preserving():
    torch.manual_seed(0)
    flow = CouplingFlow(_affine(2, 2)).double()
    *_, dlogp = flow(*_inputs(2, 2))
    assert dlogp.abs().min() > 1e-3


# --------------------------------------------------------------------------------------
# Flow, SequentialFlow, InverseFlow
# --------------------------------------------------------------------------------------


class _Recorder(Flow):
    """Adds ``shift`` going forward; records the keyword arguments it received."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift
        self.calls = []

    def _forward(self, x, **kwargs):
        self.calls.append(("forward", kwargs))
        return x + self.shift, torch.full_like(x[..., :1], self.shift)

    def _inverse(self, x, **kwargs):
        self.calls.append(("inverse", kwargs))
        return x - self.shift, torch.full_like(x[..., :1], -self.shift)


def test_flow_forward_dispatches_on_the_inverse_flag_and_passes_kwargs():
    flow = _Recorder(2.0)
    x = torch.zeros(2, 3)
    y, dlogp = flow(x, temperature=2.0)
    assert torch.equal(y, torch.full((2, 3), 2.0)) and torch.equal(dlogp, torch.full((2, 1), 2.0))
    x_back, dlogp_back = flow(y, inverse=True, temperature=2.0)
    assert torch.equal(x_back, x) and torch.equal(dlogp_back, torch.full((2, 1), -2.0))
    assert flow.calls == [("forward", {"temperature": 2.0}), ("inverse", {"temperature": 2.0})]


def test_base_flow_without_implementation_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="_forward"):
        Flow()(torch.zeros(1, 2))
    with pytest.raises(NotImplementedError, match="_inverse"):
        Flow()(torch.zeros(1, 2), inverse=True)


def test_sequential_flow_runs_blocks_in_order_and_in_reverse_order_when_inverted():
    first, second = _Recorder(1.0), _Recorder(10.0)
    flow = SequentialFlow([first, second])
    y, dlogp = flow(torch.zeros(1, 1), temperature=0.5)
    assert y.item() == 11.0 and dlogp.item() == 11.0
    x, dlogp = flow(y, inverse=True, temperature=0.5)
    assert x.item() == 0.0 and dlogp.item() == -11.0
    assert first.calls == [("forward", {"temperature": 0.5}), ("inverse", {"temperature": 0.5})]
    assert second.calls == first.calls


def test_sequential_flow_of_couplings_accepts_a_temperature_keyword():
    torch.manual_seed(0)
    flow = _realnvp_block().double()
    (x,) = _inputs(4)
    y, dlogp = flow(x)
    y_t, dlogp_t = flow(x, temperature=2.0)
    assert torch.equal(y, y_t) and torch.equal(dlogp, dlogp_t)
    x_back, _ = flow(y_t, inverse=True, temperature=2.0)
    _assert_close(x_back, x, atol=1e-10, rtol=0)


def test_sequential_flow_is_a_sized_indexable_sequence_of_its_blocks():
    blocks = [_Recorder(1.0), _Recorder(2.0), _Recorder(3.0)]
    flow = SequentialFlow(blocks)
    assert len(flow) == 3 and list(flow) == blocks and flow[1] is blocks[1]
    tail = flow[1:]
    assert isinstance(tail, SequentialFlow) and list(tail) == blocks[1:]
    assert list(flow[[2, 0]]) == [blocks[2], blocks[0]]
    assert len(list(flow.parameters())) == 0


def test_sequential_flow_trigger_stacks_results_of_blocks_having_the_method():
    class WithValue(_Recorder):
        def value(self):
            return torch.tensor(self.shift)

    flow = SequentialFlow([WithValue(1.0), _Recorder(5.0), WithValue(2.0)])
    assert torch.equal(flow.trigger("value"), torch.tensor([1.0, 2.0]))
    assert flow.trigger("no_such_method").numel() == 0


def test_inverse_flow_swaps_the_directions_of_its_delegate():
    flow = InverseFlow(_Recorder(3.0))
    y, dlogp = flow(torch.zeros(1, 1))
    assert y.item() == -3.0 and dlogp.item() == -3.0
    x, dlogp = flow(y, inverse=True)
    assert x.item() == 0.0 and dlogp.item() == 3.0


# --------------------------------------------------------------------------------------
# SplitFlow, MergeFlow, SwapFlow
# --------------------------------------------------------------------------------------


def test_split_flow_infers_the_last_size_from_the_input():
    x = torch.arange(6.0).reshape(1, 6)
    a, b, c, dlogp = SplitFlow(1, 2)(x)
    assert a.tolist() == [[0.0]] and b.tolist() == [[1.0, 2.0]] and c.tolist() == [[3.0, 4.0, 5.0]]
    assert torch.equal(dlogp, torch.zeros(1, 1))
    a, b, dlogp = SplitFlow(2, 4)(x)  # sizes covering the input exactly add no piece
    assert a.shape == (1, 2) and b.shape == (1, 4)


def test_split_flow_by_indices_takes_entries_in_the_given_order():
    x = torch.tensor([[10.0, 11.0, 12.0, 13.0]])
    a, b, _ = SplitFlow([3, 0], [1, 2])(x)
    assert a.tolist() == [[13.0, 10.0]] and b.tolist() == [[11.0, 12.0]]
    (merged, _) = MergeFlow([3, 0], [1, 2])(a, b)
    assert torch.equal(merged, x)


def test_split_flow_along_another_dimension_gives_bgflows_dlogp_shape():
    # bgflow: the input's shape with the split dimension reduced to 1
    x = torch.arange(24.0).reshape(2, 4, 3)
    a, b, dlogp = SplitFlow(1, dim=1)(x)
    assert a.shape == (2, 1, 3) and b.shape == (2, 3, 3) and dlogp.shape == (2, 1, 3)
    back, dlogp = SplitFlow(1, dim=1)(a, b, inverse=True)
    assert torch.equal(back, x) and dlogp.shape == (2, 1, 3)
    *_, dlogp = SplitFlow(2, dim=0)(torch.zeros(3, 4))
    assert dlogp.shape == (1, 4) and float(dlogp.abs().sum()) == 0.0


def test_split_flow_sizes_longer_than_the_input_are_an_error():
    with pytest.raises(ValueError, match="sizes"):
        SplitFlow(2, 3)(torch.zeros(1, 4))


@pytest.mark.parametrize(
    "args, message",
    [
        (([0, 1], [1, 2]), "overlap"),
        (([0, 0], [1]), "overlap"),
        (([0, 1], [3]), "missing \\[2\\]"),
        (([0], [2]), r"must cover 0 \.\. 2 without gaps; missing \[1\]"),
        (([0, 1], 2), "not a mixture"),
        ((), "at least one"),
        ((2, -1), "non-negative"),
    ],
)
def test_split_flow_rejects_invalid_sizes_or_indices(args, message):
    with pytest.raises(ValueError, match=message):
        SplitFlow(*args)


def test_split_flow_indices_must_match_the_input_length():
    with pytest.raises(ValueError, match="cover 3 entries"):
        SplitFlow([0, 2], [1])(torch.zeros(1, 4))


def test_merge_flow_concatenates_and_splits_back():
    a, b = torch.zeros(2, 1), torch.ones(2, 3)
    merged, dlogp = MergeFlow(1)(a, b)
    assert merged.tolist() == [[0.0, 1.0, 1.0, 1.0]] * 2 and torch.equal(dlogp, torch.zeros(2, 1))
    a_back, b_back, _ = MergeFlow(1)(merged, inverse=True)
    assert torch.equal(a_back, a) and torch.equal(b_back, b)


def test_swap_flow_exchanges_the_first_two_inputs_only():
    a, b, c = torch.zeros(2, 1), torch.ones(2, 2), torch.full((2, 3), 2.0)
    ys = SwapFlow()(a, b, c)
    assert ys[0] is b and ys[1] is a and ys[2] is c and torch.equal(ys[3], torch.zeros(2, 1))


def test_swap_flow_on_a_single_input_warns_and_changes_nothing():
    x = torch.ones(2, 3)
    with pytest.warns(UserWarning, match="no effect"):
        y, dlogp = SwapFlow()(x)
    assert y is x and torch.equal(dlogp, torch.zeros(2, 1))


# --------------------------------------------------------------------------------------
# CouplingFlow and AffineTransformer
# --------------------------------------------------------------------------------------


def test_coupling_flow_transforms_only_the_transformed_inputs():
    torch.manual_seed(0)
    flow = CouplingFlow(_affine(1, 3), transformed_indices=(0, 2), cond_indices=(1,)).double()
    xs = _inputs(1, 1, 2)
    y0, y1, y2, _ = flow(*xs)
    assert y1 is xs[1]
    assert y0.shape == (BATCH, 1) and y2.shape == (BATCH, 2)
    assert not torch.allclose(y0, xs[0]) and not torch.allclose(y2, xs[2])


def test_coupling_flow_index_sets_must_not_overlap():
    with pytest.raises(ValueError, match=r"\[1\] cannot be both transformed and conditioned"):
        CouplingFlow(_affine(2, 2), transformed_indices=(0, 1), cond_indices=(1,))


def test_coupling_flow_index_out_of_range_is_an_error():
    flow = CouplingFlow(_affine(2, 2), transformed_indices=(2,), cond_indices=(0,))
    with pytest.raises(ValueError, match="uses input 2"):
        flow(*_inputs(2, 2))


def test_coupling_flow_passes_the_conditioner_input_and_kwargs_to_the_transformer():
    class Spy(Transformer):
        def _forward(self, x, y, *cond, **kwargs):
            self.seen = (x, y, kwargs)
            return y + x, torch.zeros_like(y[..., :1])

    spy = Spy()
    x0, x1 = torch.ones(1, 2), torch.full((1, 2), 5.0)
    _, y1, _ = CouplingFlow(spy)(x0, x1, temperature=3.0)
    assert y1.tolist() == [[6.0, 6.0]]
    assert torch.equal(spy.seen[0], x0) and torch.equal(spy.seen[1], x1)
    assert spy.seen[2] == {"temperature": 3.0}


def test_affine_transformer_dlogp_is_the_sum_of_log_scales():
    scale_net = lambda x: torch.full_like(x, 10.0)  # noqa: E731  tanh(10) ~ 1
    transformer = AffineTransformer(scale_transformation=scale_net, init_downscale=0.5)
    assert transformer._log_alpha.item() == -0.5
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    y_new, dlogp = transformer(x, y)
    log_sigma = math.tanh(10.0) * math.exp(-0.5)
    _assert_close(y_new, torch.full((2, 3), math.exp(log_sigma)))
    _assert_close(dlogp, torch.full((2, 1), 3 * log_sigma))


def test_affine_transformer_with_only_a_shift_preserves_volume():
    torch.manual_seed(0)
    transformer = _affine(2, 2, scale=False).double()
    x, y = _inputs(2, 2)
    y_new, dlogp = transformer(x, y)
    _assert_close(y_new - y, transformer._shift_transformation(x))
    assert torch.equal(dlogp, torch.zeros(BATCH, 1, dtype=torch.float64))


def test_affine_transformer_with_preserve_volume_has_zero_dlogp_but_rescales():
    torch.manual_seed(0)
    transformer = _affine(2, 2, shift=False, preserve_volume=True).double()
    x, y = _inputs(2, 2)
    y_new, dlogp = transformer(x, y)
    _assert_close(dlogp, torch.zeros(BATCH, 1, dtype=torch.float64), atol=1e-14, rtol=0)
    ratio = y_new / y
    _assert_close(ratio.prod(-1), torch.ones(BATCH, dtype=torch.float64))
    assert (ratio - 1).abs().max() > 1e-3


def test_circular_affine_transformer_results_lie_in_the_unit_interval():
    shift = lambda x: torch.full_like(x, 0.75)  # noqa: E731
    transformer = AffineTransformer(shift_transformation=shift, is_circular=True)
    y = torch.tensor([[0.0, 0.25, 0.5, 0.999, -1e-20]])
    y_new, dlogp = transformer(torch.zeros_like(y), y)
    _assert_close(y_new, torch.tensor([[0.75, 0.0, 0.25, 0.749, 0.75]]))
    y = torch.tensor([[0.5, 0.75, -1e-20]])
    y_back, _ = transformer(torch.zeros_like(y), y, inverse=True)
    _assert_close(y_back, torch.tensor([[0.75, 0.0, 0.25]]))
    for out in (y_new, y_back):
        assert (out >= 0).all() and (out < 1).all()
    assert torch.equal(dlogp, torch.zeros(1, 1))


def test_circular_affine_transformer_cannot_scale():
    with pytest.raises(ValueError, match="not compatible with periodicity"):
        AffineTransformer(scale_transformation=_net(2, 2), is_circular=True)


def test_affine_transformer_network_width_must_match_the_transformed_input():
    transformer = AffineTransformer(shift_transformation=_net(2, 3))
    with pytest.raises(ValueError, match="width 3.*width 2"):
        transformer(torch.zeros(1, 2), torch.zeros(1, 2))


def test_gradients_reach_every_parameter_of_a_flow():
    torch.manual_seed(0)
    flow = _realnvp_block().double()
    (x,) = _inputs(4)
    y, dlogp = flow(x)
    (y.pow(2).sum() + dlogp.sum()).backward()
    params = dict(flow.named_parameters())
    assert any(name.endswith("_log_alpha") for name in params)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------


def test_dense_net_places_one_activation_after_each_hidden_layer():
    act = torch.nn.ReLU()
    layers = list(DenseNet([2, 5, 7, 3], activation=act)._layers)
    linear, relu = torch.nn.Linear, torch.nn.ReLU
    assert [type(m) for m in layers] == [linear, relu, linear, relu, linear]
    assert [(m.in_features, m.out_features) for m in layers[::2]] == [(2, 5), (5, 7), (7, 3)]


def test_dense_net_without_activation_is_linear_layers_only():
    layers = list(DenseNet([2, 5, 3])._layers)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.Linear]


def test_dense_net_takes_a_list_of_activations_one_per_hidden_layer():
    tanh, relu = torch.nn.Tanh(), torch.nn.ReLU()
    layers = list(DenseNet([2, 5, 7, 3], activation=[tanh, relu])._layers)
    assert layers[1] is tanh and layers[3] is relu and len(layers) == 5


def test_dense_net_activation_list_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="2 hidden layer\\(s\\) but 1 activation"):
        DenseNet([2, 5, 7, 3], activation=[torch.nn.Tanh()])


@pytest.mark.parametrize("n_units", [[3], [], [2, 0, 1], "23"])
def test_dense_net_needs_at_least_two_positive_widths(n_units):
    with pytest.raises(ValueError, match="n_units"):
        DenseNet(n_units)


def test_dense_net_scales_the_default_initial_weights():
    torch.manual_seed(1)
    plain = DenseNet([4, 8, 2])
    torch.manual_seed(1)
    scaled = DenseNet([4, 8, 2], weight_scale=0.1)
    for a, b in zip(plain._layers, scaled._layers):
        _assert_close(b.weight, 0.1 * a.weight)
        _assert_close(b.bias, a.bias)


def test_dense_net_draws_biases_in_zero_to_bias_scale():
    for layer in DenseNet([4, 50, 50], bias_scale=0.2)._layers:
        assert (layer.bias >= 0).all() and (layer.bias < 0.2).all()
        assert layer.bias.max() > 0.1  # drawn over the range, not all zero
    assert DenseNet([4, 8, 2])(torch.zeros(5, 4)).shape == (5, 2)
