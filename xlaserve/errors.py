"""Errors raised at the engine's public boundary. Imports nothing from xlaserve."""


class InvalidRequestError(ValueError):
    """A request the engine refuses: `param` names the offending field (OpenAI's `param`:
    "prompt", "max_tokens", "temperature", ...), or is None when no single field is at fault.

    Serving maps it to HTTP 400 with `param` and to gRPC INVALID_ARGUMENT from the attribute,
    never from the message text.
    """

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
