"""Node-supplied text cannot forge log lines."""

from __future__ import annotations

import io
import logging

from fedge.logs import OneLineFormatter, escape


def test_control_characters_are_escaped_and_plain_text_is_kept() -> None:
    assert escape("plain text, ünïcode") == "plain text, ünïcode"
    assert escape("a\nERROR forged\r\x1b[31m") == "a\\nERROR forged\\r\\x1b[31m"


def test_a_record_is_one_line_but_a_traceback_keeps_its_lines() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("node left: %s", "bye\nCRITICAL fedge: the server was hacked")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "WARNING node left: bye\\nCRITICAL fedge: the server was hacked"
    assert lines[1] == "ERROR failed" and lines[2].startswith("Traceback")
