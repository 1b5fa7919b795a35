"""Placeholder: being written."""


class Pipeline:  # noqa: D101
    pass


class PruningSession:  # noqa: D101
    pass
