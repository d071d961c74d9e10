"""forgetlab: the shared helpers of the notebook suite on unlearning ID vs OOD data (arXiv 2411.04388)."""
from .config import ParameterError, load_params, validate_params

__all__ = ["ParameterError", "load_params", "validate_params"]
__version__ = "0.1.0"
