"""Plain-PyTorch reference implementations of fusedlm's ops: the ground truth of every test.

Nothing here imports the rest of fusedlm.
"""
