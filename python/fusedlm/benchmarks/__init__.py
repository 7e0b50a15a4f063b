"""Benchmark suites (one per op) and the runner behind `fusedlm bench`; installed as fusedlm.benchmarks."""
