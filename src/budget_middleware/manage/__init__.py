"""The Python management API: writers and readers of the store, the config file."""
