"""forgetlab: the shared helpers of the notebook suite on unlearning ID vs OOD data (arXiv 2411.04388)."""
import os

from .config import ParameterError, load_params, validate_params

__all__ = ["ParameterError", "determinism", "load_params", "validate_params"]
__version__ = "0.1.0"


def determinism() -> None:
    """Same parameters, same numbers: deterministic kernels for everything that uses the models (CPU and CUDA).

    The one piece of process-wide state the suite sets; every notebook calls it first (tests: conftest.py).
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS reads it before its first use
    torch.use_deterministic_algorithms(True)
