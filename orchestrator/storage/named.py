"""A SQL dialect's named queries and numbered migrations, read from ``queries/<dialect>.sql``
(``-- name: claim`` blocks and ``-- migration: 2`` blocks, as procrastinate keeps its SQL).

A named query may hold another by name, ``{query:upsert_status}``: one statement that writes
several tables reuses the statements that write each, instead of repeating them."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

_MARKER = re.compile(r"^-- (name|migration): (\S+)\s*$", re.MULTILINE)
_INCLUDE = re.compile(r"\{query:(\w+)\}")


@dataclass(frozen=True)
class Queries:
    """A dialect's named queries and its migrations, in order."""

    named: dict[str, str]
    migrations: list[list[str]]
    """Each migration's statements; migration ``n`` is ``migrations[n - 1]``."""

    @classmethod
    def load(cls, dialect: str) -> Queries:
        """Read ``queries/<dialect>.sql`` from the package."""
        text = resources.files("orchestrator.storage").joinpath("queries", f"{dialect}.sql").read_text("utf-8")
        named: dict[str, str] = {}
        migrations: dict[int, list[str]] = {}
        marks = list(_MARKER.finditer(text))
        for mark, following in zip(marks, [*marks[1:], None], strict=True):
            body = text[mark.end() : following.start() if following else len(text)]
            sql = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--")).strip()
            if mark.group(1) == "name":
                named[mark.group(2)] = sql
            else:
                migrations[int(mark.group(2))] = [s.strip() for s in sql.split(";") if s.strip()]
        for name, sql in named.items():
            named[name] = _INCLUDE.sub(lambda found: named[found.group(1)], sql)
        if sorted(migrations) != list(range(1, len(migrations) + 1)):
            raise ValueError(f"{dialect}.sql: migrations must be numbered 1, 2, 3, ... without gaps")
        return cls(named, [migrations[n] for n in sorted(migrations)])


class Cursor(Protocol):
    """What ``SqlIndex`` needs of a dialect's cursor."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def fetchall(self) -> Sequence[Any]: ...


def statements(migrations: list[list[str]], version: int) -> Iterator[str]:
    """The statements that bring a schema at ``version`` to the latest."""
    for migration in migrations[version:]:
        yield from migration
