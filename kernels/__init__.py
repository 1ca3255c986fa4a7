"""How retention runs fast: Triton kernels, their pure-PyTorch reference, and the dispatch between them.

``retention`` / ``retention_step`` pick a backend (ours on CUDA, the reference on the CPU, fla on request); the
Triton module is imported only when it is used, so the package loads on machines without a GPU.
"""

from kernels.dispatch import BACKENDS, retention, retention_step
from kernels.reference import (
    retention_chunkwise_reference,
    retention_parallel_reference,
    retention_step_reference,
)

__all__ = [
    "BACKENDS",
    "retention",
    "retention_step",
    "retention_chunkwise_reference",
    "retention_parallel_reference",
    "retention_step_reference",
]
