"""Serving a model folder: an OpenAI-compatible HTTP server with continuous batching and prefix reuse of
the hybrid cache (`quintet serve`). Layers: `api` (HTTP) -> `scheduler` (batching) -> the deploy engine;
`slots` and `prefix_cache` hold the per-sequence state."""

from quintet.serve.server import load_state, serve

__all__ = ["load_state", "serve"]
