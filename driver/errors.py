"""Errors the user sees in `docker ...` output."""


class DriverError(Exception):
    """A refusal the user can act on: the message says what to do instead."""
