"""nurture: a retention-marketing orchestrator."""

__version__ = "0.1.0"
