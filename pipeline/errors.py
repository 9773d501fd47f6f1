"""Errors the pipeline raises on purpose; the Serve layer maps them to HTTP statuses."""


class CrosstrimError(Exception):
    """Base class: a message fit to show a client or an operator."""


class InvalidRequest(CrosstrimError, ValueError):
    """The request itself is wrong (bad image, too long, bad parameter): HTTP 400. `param`: the request field at
    fault ("messages[0].content"), OpenAI's error `param`, when one is."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class Overloaded(CrosstrimError):
    """Every slot and the waiting queue are full: HTTP 503, try again later."""


class EngineDead(CrosstrimError):
    """The decoder engine's step loop stopped on an unexpected error: its requests failed, its replica is unhealthy
    and is being replaced (HTTP 503, try again)."""


class ModelSourceError(CrosstrimError):
    """The checkpoint could not be found or fetched."""
