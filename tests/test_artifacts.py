"""Prefect artifacts (tasks/artifacts.py): per-model keys, and user-given names shown as text.
Hostile input: model refs carrying markdown links, HTML and headings. Catches names pasted
into markdown unescaped, and one artifact key shared by every model."""

from __future__ import annotations

import re

import pandas as pd

from layerprune.report.markdown import escape_md, escaped_table
from tasks.artifacts import artifact_key


def test_names_are_shown_as_text_never_as_markdown_or_html():
    hostile = "org/[click me](javascript:alert(1))<img src=x onerror=alert(1)>\n# heading|x"
    out = escape_md(hostile)
    assert "\n" not in out
    unescaped = re.findall(r"(?<!\\)[\[\]()<>#|]", out)
    assert unescaped == [], out  # every special character carries its backslash
    assert out.replace("\\", "") == hostile.replace("\n", " ")  # and nothing else is lost
    table = escaped_table(pd.DataFrame({"model": [hostile], "loss": [3.2]}))
    assert not re.search(r"(?<!\\)[<\[]", table) and "\\<img" in table
    assert "3.2" in table  # numbers stay numbers


def test_each_model_has_its_own_artifact_keys():
    keys = {artifact_key("prune-report", ref) for ref in (
        "bundled:SmolLM2-135M-Instruct", "/models/a/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B",
        "HuggingFaceTB/SmolLM2-135M-Instruct")}
    assert len(keys) == 4  # alike names in different places differ
    assert all(re.fullmatch(r"[a-z0-9-]+", k) for k in keys)  # what Prefect accepts
    assert artifact_key("prune-report", "Qwen/Qwen2.5-0.5B").startswith("prune-report-qwen2-5")
