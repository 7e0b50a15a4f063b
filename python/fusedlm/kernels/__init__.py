"""Triton kernels, one file per op; installed as fusedlm.kernels. Import triton lazily through these modules only."""
