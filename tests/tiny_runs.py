"""Experiments small enough for the tests: a few seconds of replica exchange, a tiny flow, a
few iterations. One definition of the common parts; each test states what it changes."""

from __future__ import annotations

#: The data, gate and evaluation sections every tiny experiment shares.
_COMMON = """
  device: cpu
  E_cut: 500.0
  E_max: 100000.0
  data: {{n_replicas: 3, t_max: 450.0, n_iterations: 60, steps_per_iteration: 20,
         equilibration_iterations: 2, platform: Reference}}
  gate:
    schedule: {{type: three_stage, e_initial: 1.0e+10, hold_epochs: 1, warmup_epochs: 2}}
  model: {model}
  training: {training}
  energy: {energy}
  evaluation: {{n_samples: 64, bins: 20}}
"""


def tiny_experiment(name: str, *, model: str, training: str, energy: str) -> str:
    """The YAML text of experiment ``name`` with the given ``model``, ``training`` and
    ``energy`` sections (flow-style YAML mappings)."""
    return f"\n{name}:" + _COMMON.format(model=model, training=training, energy=energy)
