"""aimass-hpc: AI workloads on supercomputer clusters through their batch system."""

__version__ = "0.1.0"
