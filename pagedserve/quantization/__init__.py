"""Quantized linears (int8 W8A8, fp8, AWQ int4), their checkpoint formats, Triton kernels and dispatch."""
