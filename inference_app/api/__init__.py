"""Inference over HTTP: the seed's /api/inference (seed.py) and an OpenAI-compatible /v1 (openai.py)."""
