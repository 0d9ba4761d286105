"""Training: :class:`ProgressiveKLTrainer` and its parts.

=================  ====================================================================
module             what it holds
=================  ====================================================================
``trainer``        :class:`ProgressiveKLTrainer`: the loop, epochs, state
``step``           one iteration (:class:`KLStep`) and its numbers and outcome
``gradients``      the KL / NLL gradients, combined across ranks in one collective
``policies``       what gated samples do to the KL term (:data:`SKIP_POLICIES`)
``ledger``         the epoch record (:class:`EpochRecord`, :data:`HISTORY_KEYS`)
``monitor``        :class:`HealthMonitor`: the warning signs of a stalled training
``warmup``         :class:`LinearWarmup` of the learning rate
``checkpoint``     checkpoint files and random states
``batches``        :class:`TensorBatches`: resumable batches of tensor data
``early_stopping`` keeping the best epoch: :class:`EarlyStopping`, :class:`RollbackOnRise`
=================  ====================================================================
"""

from .batches import TensorBatches
from .early_stopping import EarlyStopping, RollbackOnRise
from .ledger import HISTORY_KEYS, EpochRecord, write_history
from .monitor import HealthMonitor, TrainingHealthWarning
from .policies import SKIP_POLICIES, SkipPolicy
from .step import KLStep, StepNumbers, StepOutcome, clip_gradient
from .trainer import ProgressiveKLTrainer

__all__ = [
    "ProgressiveKLTrainer",
    "SKIP_POLICIES",
    "SkipPolicy",
    "HealthMonitor",
    "TrainingHealthWarning",
    "EpochRecord",
    "HISTORY_KEYS",
    "write_history",
    "KLStep",
    "StepNumbers",
    "StepOutcome",
    "clip_gradient",
    "TensorBatches",
    "EarlyStopping",
    "RollbackOnRise",
]
