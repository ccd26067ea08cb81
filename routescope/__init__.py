"""routescope: information-flow routes of LLM predictions, computed in pipeline stages."""
__version__ = "0.1.0"
