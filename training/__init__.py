"""Training (issue 3)."""
