"""Harnesses that measure pipelines and hooks; they call the rest of the package, nothing calls them."""
