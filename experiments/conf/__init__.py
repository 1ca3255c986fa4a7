"""The Hydra config tree of zoo-train (YAML); typed schemas are registered in experiments/config_store.py."""
