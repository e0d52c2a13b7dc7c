"""pyexec-connector: run Python for a Vantiq server."""
from .errors import QueryError

__version__ = "0.1.0"
__all__ = ["QueryError", "__version__"]
