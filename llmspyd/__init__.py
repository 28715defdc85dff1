"""llmspyd: see what LLM agents on this machine send to their model providers."""

__version__ = "0.1.0"
