"""Log lines that a node cannot forge: node-supplied text (a leave reason, an error it
reports, a metric name) is logged with its control characters escaped, so a newline in
it cannot start a line that looks like the server's own. Tracebacks keep their lines."""

from __future__ import annotations

import logging

FORMAT = "%(levelname)s %(name)s: %(message)s"


def escape(text: str) -> str:
    """`text` with every non-printable character as its escape (``\\n``, ``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def setup(level: int = logging.WARNING) -> None:
    """stderr logging for a fedge process, one line per record."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
