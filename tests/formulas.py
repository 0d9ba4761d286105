"""The schedule formula of DESIGN.md, written out independently of the package."""

from __future__ import annotations

import math


def three_stage_formula(epoch, e_initial=1e10, e_final=1e5, hold=50.0, warmup=300.0):
    """E_max of the three-stage schedule at ``epoch``, in kJ/mol."""
    if epoch < hold:
        return e_initial
    if epoch >= warmup:
        return e_final
    p = (epoch - hold) / (warmup - hold)
    return math.exp(math.log(e_initial) + p * (math.log(e_final) - math.log(e_initial)))
