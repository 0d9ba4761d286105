"""Helpers of bgflow's ``bgflow.utils`` that scripts use, as ``bg.utils.<name>``.

Examples
--------
>>> import torch
>>> from bgflow_gate.host import utils
>>> utils.as_numpy(torch.ones(2, requires_grad=True))
array([1., 1.], dtype=float32)
>>> utils.as_numpy(2.0)
array(2., dtype=float32)
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_numpy"]


def as_numpy(tensor) -> np.ndarray:
    """A tensor (or anything ``torch.as_tensor`` accepts) as a NumPy array.

    The tensor is detached from the graph and copied to the CPU first, so values that
    need gradients or live on a GPU convert too.

    Parameters
    ----------
    tensor : torch.Tensor, np.ndarray, number or sequence
        The values.

    Returns
    -------
    np.ndarray
        The values; Python floats become ``float32`` (torch's default dtype), as in bgflow.
    """
    return torch.as_tensor(tensor).detach().cpu().numpy()
