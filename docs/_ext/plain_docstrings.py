"""pygeo's docstrings are plain text in Google style: napoleon reads their "Args:" / "Returns:" / "Raises:" sections,
and this hook, which runs before napoleon, makes the rest safe for reStructuredText without editing the sources.

- A block indented deeper than the paragraph before it (the aligned tables of formulas and options the docstrings use,
  ``metric(z)   z [..., d] -> G [..., d, d]``) becomes a literal block, shown as written.
- ``|`` (norms, ``|v|_G``) and ``*`` (products, ``**options``) outside literal blocks are escaped: in plain text they
  are not substitutions or emphasis.
- Single backquotes, the docstrings' way of naming code, render as code (``default_role = "code"`` in conf.py).
"""
import re
from typing import List

SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Attributes|Example|Examples|Note|Notes|"
                     r"Warning|Warnings|See Also|References|Keyword Args|Other Parameters|Methods):\s*$")
ARG_NAME = re.compile(r"^(\s*)(\*{1,2})(\w+)")  # "*args:" / "**options:" entries, which napoleon reads itself


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape(line: str) -> str:
    match = ARG_NAME.match(line)
    head, rest = ("", line) if match is None else (line[:match.end()], line[match.end():])
    # inside ``...`` keep the text as is
    parts = re.split(r"(``.*?``)", rest)
    parts = [part if part.startswith("``") else re.sub(r"(?<!\\)([|*])", r"\\\1", part) for part in parts]
    return head + "".join(parts)


def convert(lines: List[str]) -> List[str]:
    out: List[str] = []
    level = 0           # the indentation of ordinary text where we are: 0 in free text, an entry's continuation in a section
    entry_level = None  # in a section: the indentation of its entries
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            out.append(line)
            i += 1
            continue
        indent = _indent(line)
        if indent == 0:
            entry_level = None
            level = 0
            if SECTION.match(line):
                out.append(line)
                entry_level = -1  # set by the first entry
                i += 1
                continue
        elif entry_level == -1:
            entry_level = indent
            level = indent
        elif entry_level is not None and indent == entry_level:
            level = indent
        elif entry_level is not None and level == entry_level and indent > entry_level:
            level = indent  # the first continuation line of an entry: napoleon's
        if indent > level and not (out and out[-1].lstrip().startswith(".. ")):
            # A deeper block: a literal block at `level`, to the next line back at `level` or shallower.
            block = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > level):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", " " * level + "::", ""] + block + [""]
            continue
        if line.lstrip().startswith(".. "):  # a directive (reST written on purpose): its content stays as it is
            out.append(line)
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                out.append(lines[i])
                i += 1
            continue
        out.append(_escape(line))
        i += 1
    return out


def process(app, what, name, obj, options, lines):
    lines[:] = convert(lines)


def setup(app):
    app.connect("autodoc-process-docstring", process, priority=100)  # before napoleon (priority 500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
