"""arch-zoo's Optuna sweeper as a Hydra plugin.

Hydra builds a sweeper only from a class of its ``hydra_plugins`` namespace, which it scans at start-up. This folder
is that namespace's portion: pyproject.toml ships ``sweeps/hydra_plugins`` as the top-level ``hydra_plugins`` (wheel
and editable install alike), so the sweeper is found by Hydra's own discovery and nothing is registered by hand.
The search itself lives in :mod:`sweeps.optuna_sweeper`.
"""

from sweeps import optuna_sweeper


class OptunaSweeper(optuna_sweeper.OptunaSweeper):
    """:class:`sweeps.optuna_sweeper.OptunaSweeper` under the name Hydra instantiates plugins by
    (``hydra_plugins.arch_zoo_optuna.OptunaSweeper``, the ``_target_`` of ``hydra/sweeper=optuna``)."""
