"""Sweep, ablation-variant and architecture config groups (YAML)."""
