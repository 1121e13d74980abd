"""Exceptions that carry a user-facing sentence.

CLIs catch :class:`FatqError` and print its message (one sentence, no traceback) with exit
status 2; anything else is a bug and keeps its traceback.
"""


class FatqError(Exception):
    """A user error: bad input, missing file, incompatible checkpoint, missing extra."""


class CheckpointError(FatqError):
    """A checkpoint that cannot be read or does not fit the requested model."""


class MissingExtraError(FatqError):
    """An optional dependency is not installed; the message names the pip extra (see :mod:`fatq.extras`).

    ``extra`` None: a core dependency, which only a broken install lacks.
    """

    def __init__(self, package: str, extra: str | None):
        if extra is None:
            super().__init__(f"{package} is not installed; reinstall fatq (`pip install fatq`).")
        else:
            super().__init__(f"{package} is not installed; install it with `pip install 'fatq[{extra}]'`.")
        self.package = package
        self.extra = extra
