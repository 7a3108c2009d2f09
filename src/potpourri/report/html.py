"""A small, dependency-free HTML report: sections of text, tables and pictures, written next to the run."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potpourri.core.io import atomic_write_bytes

__all__ = ["Report"]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0.5em}figcaption{font-size:0.9em;color:#555;text-align:center}
img{max-width:100%}.note{color:#555;font-size:0.9em}code{background:#f3f3f3;padding:1px 4px}
"""


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


@dataclass(frozen=True)
class _Figure:
    path: str
    caption: str
    width: int | None


@dataclass
class Report:
    """Collects sections and writes ``report.html``; picture paths are stored relative to the report.

    Example:
        report = Report("potpourri demo"); report.section("Accuracy"); report.table(rows); report.write(path)
    """

    title: str
    parts: list[str | _Figure] = field(default_factory=list)

    def section(self, heading: str, text: str = "") -> None:
        self.parts.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            self.text(text)

    def text(self, text: str, *, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre><code>{html.escape(text)}</code></pre>")

    def table(self, rows: list[dict[str, Any]]) -> None:
        """A table whose columns are the keys of the first row."""
        if not rows:
            return
        columns = list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_format(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def image(self, path: str | os.PathLike, caption: str = "", *, width: int | None = None) -> None:
        """A picture; ``path`` is made relative to the report folder when written."""
        self.parts.append(_Figure(str(path), caption, width))

    def render(self, folder: Path) -> str:
        body = []
        for part in self.parts:
            if isinstance(part, _Figure):
                src = html.escape(os.path.relpath(part.path, folder))
                style = f' style="width:{part.width}px"' if part.width else ""
                caption = html.escape(part.caption)
                cap = f"<figcaption>{caption}</figcaption>" if caption else ""
                body.append(f'<figure><img src="{src}"{style} alt="{caption}">{cap}</figure>')
            else:
                body.append(part)
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(body)}</body></html>"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report atomically and return its path."""
        path = Path(path)
        atomic_write_bytes(path, self.render(path.parent).encode("utf-8"))
        return path
