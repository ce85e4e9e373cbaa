"""Transparent sidecar proxy in front of OpenAI- and Anthropic-compatible APIs."""
