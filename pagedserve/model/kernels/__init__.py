"""Triton kernels of the model (attention, fused elementwise ops), each with a torch dispatch module."""
