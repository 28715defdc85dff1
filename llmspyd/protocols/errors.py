"""Protocol errors raised inside the parsers.

Parsers never let these escape to the pipeline: each is turned into a
`MessageBroken` event whose `reason` is the class's `reason`, and counted.
"""

from __future__ import annotations


class LlmspyProtocolError(Exception):
    """Base of every error a protocol parser raises on bad captured bytes."""

    reason = "parse_error"


class ParseError(LlmspyProtocolError):
    """The bytes do not follow the protocol's grammar."""


class LimitExceeded(ParseError):
    """A named limit (header block size, CONTINUATION count, ...) was exceeded."""

    reason = "limit"


class DecodeError(LlmspyProtocolError):
    """A body's Content-Encoding could not be undone."""

    reason = "decode_error"


class ConnectionUnrecoverable(LlmspyProtocolError):
    """Connection-wide state is lost (HTTP/2 framing or HPACK after a gap or error)."""

    reason = "unrecoverable"
