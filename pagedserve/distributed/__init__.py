"""Tensor parallelism: how a model is split over ranks (partition), the collectives the model
calls (group), and the worker processes that hold ranks 1..T-1 (executor)."""
