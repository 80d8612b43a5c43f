"""The undo engine: selection, the inverse, applying it, rewinding tables."""
