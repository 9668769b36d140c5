"""Prefect flows: the EnsembleLoRA pipeline and each of its stages as a subflow."""
