"""The one exception type `protocol` raises, whatever the input."""


class ProtocolError(ValueError):
    """Bytes that are not a valid kext record. The message names the problem."""
