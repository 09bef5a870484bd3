"""llmpipe: from raw web pages to an aligned, evaluated chat model."""

__version__ = "0.1.0"
