"""vlacl: continual learning of Vision-Language-Action robot policies with LoRA."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlacl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
