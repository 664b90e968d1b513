"""Built-in plugins. Each module exposes PLUGINS, the list the registry loads."""
