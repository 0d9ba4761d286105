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
"""

from . import bg
from .bg import HOST
from .gate import ScheduledEnergyGate
from .schedules import (
    ConstantSchedule,
    LinearSchedule,
    Schedule,
    ThreeStageSchedule,
    schedule_from_dict,
)
from .stats import GateReason

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
    "__version__",
]
