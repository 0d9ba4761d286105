"""What a physical generator is made of, to compare one built without OpenMM (in a process
that hides it, :mod:`test_offline_run`) with one built with it."""

from __future__ import annotations

import torch


def physical_parts(system, target) -> dict:
    """What the physical generators of ``system`` (an AlanineDipeptide or a snapshot; seed 0,
    both rotor sets, float64) are made of: z-matrix, rotor mask, minimum, initial weights and
    a few samples."""
    from bgflow_gate.systems.physical import ALL_ROTORS, BACKBONE_ROTORS, physical_generator, physical_inputs

    torch.set_num_threads(1)
    parts = {"minimum": torch.as_tensor(physical_inputs(system).minimum)}
    for name, rotors in (("all", ALL_ROTORS), ("backbone", BACKBONE_ROTORS)):
        torch.manual_seed(0)
        gen = physical_generator(system, target, rotors=rotors, hidden=8, n_torsion_layers=1, n_rest_layers=1,
                                 n_bins=4, dtype=torch.float64)
        layout, ic = gen.flow._blocks[1], gen.flow._blocks[2]._delegate
        with torch.no_grad():
            x = gen.sample(4)
        parts[name] = {"z_matrix": torch.as_tensor(ic.z_matrix), "rotor_index": layout.rotor_index.clone(),
                       "weights": gen.flow.state_dict(), "samples": x}
    return parts
