"""Downstream evaluation through lm-evaluation-harness: the model wrapper (``lm``) and the project's own tasks."""
