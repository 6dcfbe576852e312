"""longserve's HTTP server: OpenAI-compatible API, metrics and the CLI."""

__version__ = "0.1.0"
