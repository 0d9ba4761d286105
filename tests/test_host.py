"""The built-in host's Energy follows bgflow's conventions."""

from __future__ import annotations

import pytest
import torch

from bgflow_gate.host import Energy


class Sum(Energy):
    def _energy(self, *xs):
        return sum((x**2).flatten(start_dim=x.dim() - len(s)).sum(-1, keepdim=True) for x, s in zip(xs, self.event_shapes))


@pytest.mark.parametrize(
    "dim, shapes",
    [(3, [(3,)]), ([2, 3], [(2, 3)]), ([[2], [4, 3]], [(2,), (4, 3)])],
)
def test_dim_is_parsed_into_event_shapes(dim, shapes):
    assert [tuple(s) for s in Sum(dim).event_shapes] == shapes


@pytest.mark.parametrize("dim", [0.5, [], [[]], "3", [2, [3]], True])
def test_invalid_dim_is_a_clear_error(dim):
    with pytest.raises(ValueError, match="dim must be"):
        Sum(dim)


def test_dim_and_event_shape_of_single_and_multi_input_energies():
    assert Sum(5).dim == 5 and tuple(Sum(5).event_shape) == (5,)
    with pytest.warns(UserWarning, match="multidimensional"):
        assert Sum([2, 3]).dim == 6
    with pytest.raises(ValueError, match="event_shapes"):
        Sum([[2], [3]]).event_shape


def test_energy_divides_by_temperature_and_has_shape_batch_by_one():
    e = Sum(2)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert e.energy(x).tolist() == [[5.0], [9.0]]
    assert e.energy(x, temperature=2.0).tolist() == [[2.5], [4.5]]
    assert e.energy(torch.zeros(4, 3, 2)).shape == (4, 3, 1)


def test_inputs_of_the_wrong_shape_or_number_are_rejected_with_a_message():
    with pytest.raises(ValueError, match=r"event shape \(3,\)"):
        Sum(3).energy(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="expects 2 input"):
        Sum([[2], [3]]).energy(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="batch shape"):
        Sum([[2], [3]]).energy(torch.zeros(4, 2), torch.zeros(5, 3))


def test_base_energy_without_an_implementation_says_so():
    with pytest.raises(NotImplementedError, match="_energy"):
        Energy(2).energy(torch.zeros(1, 2))


def test_force_is_minus_the_gradient_for_every_input():
    x = torch.tensor([[1.0, -2.0]])
    assert Sum(2).force(x).tolist() == [[-2.0, 4.0]]
    a, b = torch.ones(1, 2), torch.full((1, 3), 2.0)
    fa, fb = Sum([[2], [3]]).force(a, b, temperature=2.0)
    assert fa.tolist() == [[-1.0, -1.0]] and fb.tolist() == [[-2.0, -2.0, -2.0]]
    fa, fb = Sum([[2], [3]]).force(a, b, ignore_indices=[1])
    assert fb is None and fa.tolist() == [[-2.0, -2.0]]


def test_force_keeps_a_graph_for_higher_derivatives_unless_no_grad():
    x = torch.tensor([[1.0, 2.0]])
    assert Sum(2).force(x).requires_grad
    assert not Sum(2).force(x, no_grad=True).requires_grad
    assert not x.requires_grad  # the caller's tensor is left alone
