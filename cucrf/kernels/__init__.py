"""CUDA C sources of the GPU backend (package data; loaded by :mod:`cucrf._cuda`)."""
