"""The package's version, stated once: ``weightfs.__version__`` imports it and the build
backend (``_build/weightfs_build.py``) reads it for the wheel's metadata."""

__version__ = "0.1.0"
