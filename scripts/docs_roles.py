"""A griffe extension for the docs build: docstrings written for ``help()`` render in Markdown.

- Sphinx roles: ``:class:`gossip.flat.FlatParams``` would show as raw text; it becomes
  ```gossip.flat.FlatParams``` (``:role:`~a.b.C``` becomes ```C```, Sphinx's short form).
- A docstring that opens with ``Args:`` on the quotes' line (the algorithm configs) has its
  entries flush left once dedented, so no section parser sees them: they are indented back.

Used by mkdocs.yml; see scripts/docs.sh.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|py:\w+):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def strip_roles(text: str) -> str:
    return _ROLE.sub(_code, text)


def indent_leading_section(text: str) -> str:
    """``Args:\nname: text\nmore text`` -> the same with the entries indented (Google style);
    ``a: text. b: text`` on one line are two entries."""
    lines = text.split("\n")
    if len(lines) < 2 or lines[0].strip() not in ("Args:", "Attributes:") or \
            lines[1].startswith(" "):
        return text
    out = [lines[0]]
    for k, line in enumerate(lines[1:], start=1):
        if not line.strip():
            out += lines[k:]
            break
        # "alpha: outer momentum. beta: outer learning rate." holds two entries
        for part in re.split(r"(?<=\.) (?=\w+: )", line):
            out.append(("    " if re.match(r"\w+: ", part) else "        ") + part)
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = indent_leading_section(strip_roles(obj.docstring.value))
