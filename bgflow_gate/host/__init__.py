"""bgflow-compatible host: the parts of bgflow's API that bgflow-gate uses.

Used when real ``bgflow`` cannot be imported (see :mod:`bgflow_gate.bg`). Class names,
signatures and return conventions follow bgflow, so code written against ``bgflow``
runs on this host unchanged.
"""

from .distributions import DataSetSampler, NormalDistribution, Sampler
from .energy import DoubleWellEnergy, Energy
from .flows import (
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
from .generator import (
    BoltzmannGenerator,
    effective_sample_size,
    log_weights,
    log_weights_given_latent,
    sampling_efficiency,
)
from .ic import GlobalInternalCoordinateTransformation, MixedCoordinateTransformation
from .nn import DenseNet
from .splines import ConditionalSplineTransformer
from .training import KLTrainer, LossReporter
from . import utils  # bgflow.utils (as_numpy)

__all__ = [
    "Energy",
    "DoubleWellEnergy",
    "Sampler",
    "NormalDistribution",
    "DataSetSampler",
    "BoltzmannGenerator",
    "log_weights",
    "log_weights_given_latent",
    "effective_sample_size",
    "sampling_efficiency",
    "Flow",
    "SequentialFlow",
    "SplitFlow",
    "MergeFlow",
    "SwapFlow",
    "InverseFlow",
    "CouplingFlow",
    "Transformer",
    "AffineTransformer",
    "ConditionalSplineTransformer",
    "GlobalInternalCoordinateTransformation",
    "MixedCoordinateTransformation",
    "DenseNet",
    "KLTrainer",
    "LossReporter",
    "OpenMMBridge",
    "OpenMMEnergy",
    "utils",
]

# OpenMM is optional and slow to import: its classes load on first use.
_LAZY = {"OpenMMBridge": ".openmm", "OpenMMEnergy": ".openmm"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
