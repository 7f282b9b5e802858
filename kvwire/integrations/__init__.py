"""Integrations with model frameworks (optional dependencies, imported on demand)."""
