"""TokenFlow: training-free text-driven video editing."""
__version__ = "0.1.0"
