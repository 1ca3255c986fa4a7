"""lm-eval tasks made by this project, in lm-eval's local-file format (``TaskManager(include_path=TASKS_DIR)``)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
