"""Docstrings as the API reference shows them (a griffe extension, named in mkdocs.yml).

jaxbn's docstrings are written for ``help()`` and doctest: bare ``>>>`` examples
and Sphinx roles (``:func:`jaxbn.from_torch```). Markdown would read the first
as nested quotes and print the second as it is, so each docstring is rewritten
before it is parsed: an example (its prompts and its output, up to a blank line)
becomes a fenced Python block, and a role becomes a code span. The source files
are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def markdown(text: str) -> str:
    """``text`` with its doctest examples fenced and its Sphinx roles as code spans."""
    lines, out = text.splitlines(), []
    at = 0
    while at < len(lines):
        line = lines[at]
        if not line.lstrip().startswith(">>>"):
            out.append(ROLE.sub(r"`\1`", line))
            at += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        out.append(f"{indent}```python")
        while at < len(lines) and lines[at].strip() and lines[at].startswith(indent):
            out.append(lines[at])
            at += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestsAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
