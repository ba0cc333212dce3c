"""The calls stage 2 makes: backends (local model, OpenAI-compatible endpoint), the client that adds retries
and the call journal, and the cluster-wide rate limiter."""
