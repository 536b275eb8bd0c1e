"""Benchmarks: `bench serve` (load generator for any OpenAI-compatible server) and `bench throughput` (offline)."""
