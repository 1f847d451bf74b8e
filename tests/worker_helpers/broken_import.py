"""A module whose import fails, as a user module with a bug would."""

raise RuntimeError("this module fails on import")
