"""Checks shared by the CLI's bad-input tests."""

from __future__ import annotations


def one_line_error(capsys, *fragments: str) -> str:
    """The command ended with one line ``error: ...`` naming ``fragments`` (progress bars and
    warnings may come before it), and no traceback; returns that line."""
    err = capsys.readouterr().err.strip()
    last = err.replace("\r", "\n").splitlines()[-1] if err else ""
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, err
    return last
