"""Which runs make a table: Hydra multirun configs (grids over variants and seeds, an Optuna search).

Selected with one override, e.g. ``zoo-train -m +sweep=retnet_ablation``; ``configs/`` is on Hydra's search path.
"""
