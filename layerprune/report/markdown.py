"""Markdown that shows user-given text as text: model refs, labels and paths go into reports and
Prefect artifacts, and a model named `[x](javascript:...)` or `<img onerror=...>` must appear as
those characters, never as a link or HTML."""

from __future__ import annotations

import re

# What markdown or HTML could read as syntax inside a line. Names never start a line here
# (newlines are replaced), so list and heading markers at a line's start cannot arise.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|<>~&])")


def escape_md(text: object) -> str:
    """`text` as literal markdown: each special character backslash-escaped, newlines as spaces."""
    return _SPECIAL.sub(r"\\\1", str(text).replace("\r", " ").replace("\n", " "))


def escaped_table(frame) -> str:
    """A DataFrame as a markdown table, every header and text cell escaped (numbers as they
    are)."""
    frame = frame.astype(object).where(frame.notna(), "")
    return frame.rename(columns=escape_md).map(
        lambda v: escape_md(v) if isinstance(v, str) else v).to_markdown(index=False)
