"""llm-cost-exporter: priced, attributed, durable LLM usage as Prometheus metrics."""

__version__ = "0.1.0"
