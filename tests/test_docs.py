"""The documentation as a reader meets it: the configuration page is the schema's, every relative link in the README
and docs/ leads somewhere, and every `mokd ...` command line they quote parses."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from mokd import config as schema
from mokd.launch.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_configuration_page_is_generated_from_the_schema():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == schema.reference_markdown(), (
        "docs/configuration.md is stale: regenerate it with `mokd config --markdown > docs/configuration.md`")


def test_configuration_page_changes_when_an_option_does(monkeypatch):
    """The check above can fail: a changed help text (or default) changes the generated page."""
    before = schema.reference_markdown()
    train_fields = {item.name: item for item in dataclasses.fields(schema.TrainConfig)}
    changed = dict(train_fields["epochs"].metadata, help="a different meaning")
    monkeypatch.setattr(train_fields["epochs"], "metadata", changed)
    assert schema.reference_markdown() != before
