"""The version of ensdiv (a module of its own so that library modules can state it without
importing the package's public API)."""

__version__ = "0.1.0"
