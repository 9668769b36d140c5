"""EnsembleLoRA core library: fine-tune on many datasets by grouping them, training one adapter
per group, and ensembling (Li et al., ACL 2025). Pure Python + torch/numpy; no Prefect import."""
__version__ = "0.1.0"
