"""Parameter counting (total, active per token, by category and layer)."""
