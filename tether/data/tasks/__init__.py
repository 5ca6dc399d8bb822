"""Built-in tasks and data sets that need no download."""
