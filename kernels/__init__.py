"""TokenSelect selection kernels: PyTorch references and Triton kernels (CUDA)."""
