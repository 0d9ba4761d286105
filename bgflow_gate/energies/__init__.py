"""Batched PyTorch energies of OpenMM systems.

:class:`TorchEnergy` evaluates an ``openmm.System``'s potential energy (in kT) for a whole
batch of configurations as one tensor computation on the input's device, with forces by
autograd. Only :meth:`TorchEnergy.from_openmm` needs OpenMM; the energy saves to a
dictionary of tensors (:meth:`TorchEnergy.to_dict`) that loads without it.
"""

from .openmm_reader import UnsupportedForceError
from .torch_energy import TorchEnergy

__all__ = ["TorchEnergy", "UnsupportedForceError"]
