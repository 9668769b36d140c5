"""Thin Prefect @task wrappers around ensemble_core: cache keys, JSON results, tags, retries,
progress. No math here."""
