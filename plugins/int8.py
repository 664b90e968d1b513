"""Plugin int8 (in progress)."""
PLUGINS: list = []
