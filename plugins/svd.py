"""Plugin svd (in progress)."""
PLUGINS: list = []
