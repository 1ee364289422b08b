"""Export (issue 4)."""
