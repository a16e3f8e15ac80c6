"""The installed distribution's version, read once from its package metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("a2a-redis")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
