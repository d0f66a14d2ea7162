"""Triton kernels (installed as ``dspark_vllm.kernels``), each beside its PyTorch reference.

Dispatch rule: Triton on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1`` for tests),
the PyTorch reference everywhere else.
"""
