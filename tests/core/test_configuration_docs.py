"""Every environment variable settings.py reads is documented in .env.example and
docs/configuration.md, so that the two cannot drift apart as settings are added."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def variables_read_by_settings() -> set[str]:
    """Names passed to `env(...)` / `env.<cast>(...)` in settings.py, found by parsing it."""
    tree = ast.parse((ROOT / "iotplatform" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func, first = node.func, node.args[0]
        is_env = (isinstance(func, ast.Name) and func.id == "env") or (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "env"
        )
        if is_env and isinstance(first, ast.Constant) and isinstance(first.value, str):
            names.add(first.value)
    return names


def test_settings_read_variables_at_all() -> None:
    # Guards the parser: if settings stopped using `env`, the other tests would pass vacuously.
    assert {"DATABASE_URL", "MQTT_URL", "CELERY_BROKER_URL", "SECRET_KEY"} <= (
        variables_read_by_settings()
    )


@pytest.mark.parametrize("document", [".env.example", "docs/configuration.md"])
def test_every_setting_variable_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    missing = sorted(
        name for name in variables_read_by_settings() if not re.search(rf"\b{name}\b", text)
    )
    assert not missing, f"{document} does not mention: {', '.join(missing)}"


def test_env_example_changes_nothing_when_copied_verbatim() -> None:
    # Every assignment is commented out: `cp .env.example .env` must keep the embedded defaults.
    lines = (ROOT / ".env.example").read_text().splitlines()
    active = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert not active
