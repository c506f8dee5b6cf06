"""What every section gets: the mode (GPU or dry run), folders, its time budget."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository


@dataclass
class Context:
    dry: bool                   # CPU dry run at toy sizes
    out: Path                   # the output folder (tables, log)
    budget_s: float             # seconds this section may take (the driver kills it later than that)
    result_path: Path | None = None
    root: Path = ROOT
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        """Seconds left of this section's budget."""
        return self.budget_s - (time.monotonic() - self.started)

    def checkpoint(self, result) -> None:
        """Writes the result so far: a section killed at its time limit still reports what it did."""
        if self.result_path is not None:
            result.seconds = time.monotonic() - self.started
            tmp = self.result_path.with_suffix(".part")
            tmp.write_text(json.dumps(result.to_json()))
            tmp.replace(self.result_path)


def log(*parts) -> None:
    """One line to the section's output (the driver copies it to the console and the log file)."""
    print(*parts, flush=True)
