"""bgflow-gate: epoch-scheduled energy gating for training Boltzmann generators with bgflow.

Public names
------------
bg
    The bgflow API: real ``bgflow`` when it imports, otherwise the built-in host.
HOST
    ``"bgflow"`` or ``"builtin"``: which one ``bg`` is.
ThreeStageSchedule, LinearSchedule, ConstantSchedule, schedule_from_dict
    E_max schedules (kJ/mol as a function of the epoch).
ScheduledEnergyGate
    A bgflow ``Energy`` that gates a target energy with a scheduled E_max.
GateReason
    Codes for why a sample was gated.
ProgressiveKLTrainer
    bgflow's ``KLTrainer`` with epochs, skip policies, statistics, a health monitor and
    checkpoints.
HealthMonitor, TrainingHealthWarning
    The warning signs of a stalled gated training.
TorchEnergy, UnsupportedForceError
    An OpenMM system's energy (kT) batched in PyTorch on the input's device; forces by
    autograd.
"""

from . import bg
from .bg import HOST
from .energies import TorchEnergy, UnsupportedForceError
from .gate import ScheduledEnergyGate
from .schedules import (
    ConstantSchedule,
    LinearSchedule,
    Schedule,
    ThreeStageSchedule,
    schedule_from_dict,
)
from .stats import GateReason
from .training import SKIP_POLICIES, HealthMonitor, ProgressiveKLTrainer, TrainingHealthWarning

__version__ = "0.1.0"

__all__ = [
    "bg",
    "HOST",
    "Schedule",
    "ThreeStageSchedule",
    "LinearSchedule",
    "ConstantSchedule",
    "schedule_from_dict",
    "ScheduledEnergyGate",
    "GateReason",
    "ProgressiveKLTrainer",
    "SKIP_POLICIES",
    "HealthMonitor",
    "TrainingHealthWarning",
    "TorchEnergy",
    "UnsupportedForceError",
    "__version__",
]
