"""The package version, apart from ``potpourri/__init__`` so that low layers can record it without importing it all."""

__version__ = "0.1.0"
