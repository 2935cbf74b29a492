"""The Hydra config, installed as the package `job.configs` (see pyproject.toml)."""
