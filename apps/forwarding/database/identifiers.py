"""Identifiers an owner types (schema, table, columns): validated, then quoted by the driver.

Validation is deliberately narrower than what either server accepts: ASCII letters, digits and
underscores, not starting with a digit, at most 63 characters (PostgreSQL's limit; MySQL allows
64). That refuses every trick a hostile name could try — quotes, backticks, semicolons, comment
markers, whitespace, NUL, look-alike Unicode letters, names that are silently truncated — before
any quoting happens, so quoting is a second wall, not the only one.

Quoting: PostgreSQL names go through `psycopg.sql.Identifier` (the driver's identifier API).
PyMySQL has no identifier API (it only escapes values), so MySQL names are quoted here with
backticks, doubling any backtick; after validation there is none to double, but the quoting
function does not rely on that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from django.core.exceptions import ValidationError

MAX_LENGTH = 63
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def check(name: str, what: str = "name") -> str:
    """Return `name` if it is a plain identifier; raise ValidationError saying why not."""
    if not isinstance(name, str) or not name:
        raise ValidationError(f"The {what} is empty.", code="identifier")
    if len(name) > MAX_LENGTH:
        raise ValidationError(
            f"The {what} is longer than {MAX_LENGTH} characters.", code="identifier"
        )
    if not _IDENTIFIER.fullmatch(name):
        raise ValidationError(
            f"The {what} {name[:70]!r} may only hold ASCII letters, digits and underscores, "
            "and may not start with a digit.",
            code="identifier",
        )
    return name


def check_all(names: Iterable[str], what: str) -> list[str]:
    return [check(name, what) for name in names]


def mysql_quote(name: str) -> str:
    """`name` as a MySQL/MariaDB quoted identifier. PyMySQL offers no identifier quoting, so
    this is the one place that does it: validate, then backticks with inner ones doubled."""
    check(name)
    return "`" + name.replace("`", "``") + "`"
