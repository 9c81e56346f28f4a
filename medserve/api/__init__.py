"""The OpenAI-compatible HTTP layer: wire models, routes, streaming, error mapping."""
