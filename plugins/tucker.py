"""Plugin tucker (in progress)."""
PLUGINS: list = []
