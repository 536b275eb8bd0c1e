"""The fp8 storage type and its range, apart from fp8.py so the Triton kernels (triton_w8a8.py) and the
torch paths (fp8.py) can both use them without importing each other."""
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
