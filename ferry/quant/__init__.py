"""Quantized weight formats: one weight method per format (see docs/architecture.md)."""
