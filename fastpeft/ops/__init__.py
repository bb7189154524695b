"""Math of the adapter methods: pure-PyTorch references (the oracle and the CPU path) and Triton kernels.

Nothing here imports fastpeft.nn or fastpeft.patch: ops are the bottom layer.
"""
