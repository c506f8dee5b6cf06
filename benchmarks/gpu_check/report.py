"""What a section hands back (status, tables, notes) and the markdown the driver writes from it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# statuses: pass; fail (a check failed); error (the section raised or crashed); timeout;
# skipped (not run, with the reason: no GPU in a dry run, a tool that is not available)
FAILED = ("fail", "error", "timeout")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""

    def add(self, *cells) -> None:
        assert len(cells) == len(self.columns), (self.title, cells)
        self.rows.append([_cell(c) for c in cells])


@dataclass
class Result:
    name: str
    title: str
    status: str = "pass"
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    data: dict = field(default_factory=dict)       # raw numbers for the JSON file
    seconds: float = 0.0

    def table(self, title: str, columns: list[str], note: str = "") -> Table:
        t = Table(title, columns, note=note)
        self.tables.append(t)
        return t

    def fail(self, why: str) -> None:
        """A check failed: the section fails, and says why."""
        if self.status not in ("error", "timeout"):
            self.status = "fail"
        self.notes.append(f"FAILED: {why}")

    def skip(self, why: str) -> None:
        self.status = "skipped"
        self.summary = why

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Result":
        d = dict(d)
        d["tables"] = [Table(**t) for t in d.get("tables", [])]
        return cls(**d)


def _cell(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c != c:
            return "nan"
        if c == 0:
            return "0"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 1:
            return f"{c:.2f}"
        if abs(c) >= 1e-3:
            return f"{c:.4f}"
        return f"{c:.2e}"
    return str(c).replace("|", "\\|").replace("\n", " ")


def markdown_table(t: Table) -> list[str]:
    lines = [f"**{t.title}**", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    if not t.rows:
        lines.append("| " + " | ".join(["(none)"] + [""] * (len(t.columns) - 1)) + " |")
    if t.note:
        lines += ["", t.note]
    return lines + [""]


def render(header: list[str], results: list[Result]) -> str:
    lines = ["# seqwrap GPU check", "", *header, "", "## Summary", "",
             "| section | status | seconds | summary |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.title} | {r.status} | {r.seconds:.0f} | {_cell(r.summary)} |")
    lines.append("")
    for r in results:
        lines += [f"## {r.title}", "", f"Status: **{r.status}** ({r.seconds:.0f} s). {r.summary}", ""]
        lines += [f"- {n}" for n in r.notes]
        if r.notes:
            lines.append("")
        for t in r.tables:
            lines += markdown_table(t)
    return "\n".join(lines) + "\n"


def write_json(path, header: list[str], results: list[Result]) -> None:
    path.write_text(json.dumps({"header": header, "sections": [r.to_json() for r in results]}, indent=1))
