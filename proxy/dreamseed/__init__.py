"""DreamSeed's edge proxy: routes OpenAI-compatible requests to self-hosted LLM backends."""

__version__ = "0.1.0"
