"""What the runs mean: MLflow's records -> comparison tables (Markdown, LaTeX, CSV) and plots.

Reads MLflow only (``runs``), never the training code, so it works on any tracking store, including one copied
from another machine. ``paper`` holds the RetNet paper's reported numbers; ``table`` and ``plots`` turn a sweep's
runs into the table and figures; ``cli`` is the ``zoo-table`` command.
"""
