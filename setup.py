from pathlib import Path

from setuptools import find_packages, setup

OPENMM = ["openmm>=8.1", "openmmtools>=0.23", "mdtraj>=1.9"]

setup(
    name="bgflow-gate",
    version="0.1.0",
    description="Epoch-scheduled energy gating for training Boltzmann generators with bgflow",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["bgflow_gate", "bgflow_gate.*"]),
    # the experiments file ships with the package: the installed command works from any directory
    package_data={"bgflow_gate": ["experiments.yaml"]},
    install_requires=[
        "torch>=2.1,<3",
        "numpy>=1.24",
        "pyyaml>=6",
        "zuko>=1.1",
    ],
    extras_require={
        # molecular systems: OpenMM energies, openmmtools' alanine dipeptide, mdtraj topologies
        "openmm": OPENMM,
        "plots": ["matplotlib>=3.5"],
        "dev": ["pytest>=7", "matplotlib>=3.5", *OPENMM],
    },
    entry_points={"console_scripts": ["bgflow-gate=bgflow_gate.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Chemistry",
    ],
)
