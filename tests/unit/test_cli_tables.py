"""Tables an operator reads in a pipe (80 columns): identifiers come out whole."""

import io

from rich.console import Console

from fedge.cli import _keyed_table

HEADERS = ("cid", "state", "connected", "live", "cert expires", "last seen", "tasks done")


def rendered(key: str, ids: list[str], *headers: str) -> str:
    table = _keyed_table(key, ids, *headers)
    for node_id in ids:
        table.add_row(node_id, *("2026-12-04 08:00:00 some long cell" for _ in headers))
    out = io.StringIO()
    Console(file=out, width=80).print(table)
    return out.getvalue()


def test_a_wide_table_keeps_every_identifier_on_one_line() -> None:
    ids = ["node-1", "node-12", "a-device-with-a-long-certificate-name-07"]
    text = rendered("node", ids, *HEADERS, "labels", "serving")
    for node_id in ids:
        assert any(node_id in line for line in text.splitlines()), text


def test_the_key_column_is_at_least_as_wide_as_its_header() -> None:
    text = rendered("token id", ["t1"], "for", "state")
    assert "token id" in text.splitlines()[1]
