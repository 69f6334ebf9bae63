"""The Textual app of mixrun, imported as ``mixrun.tui``."""
