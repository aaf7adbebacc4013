"""The one exception type users see."""


class PerfusionError(ValueError):
    """Something the user can fix: a bad concept file, a concept that does not fit the model, a bad tag.

    The message says what is wrong and what to do. Raised before anything is modified.
    """
