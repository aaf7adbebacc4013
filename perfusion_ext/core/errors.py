"""The one exception type users see."""


class PerfusionError(ValueError):
    """Something the user can fix: a bad concept file, a concept that does not fit the model, a bad tag.

    The message says what is wrong and what to do. Raised before anything is modified.
    """


class WriteError(PerfusionError, OSError):
    """A file could not be written (a read-only folder, a full disk). Still an OSError, so code that cleans up
    after failed file operations keeps working; the previous file, if any, is intact (see core.atomic)."""
