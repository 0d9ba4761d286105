"""Systems to train on: test systems with their energies, data and analysis."""
