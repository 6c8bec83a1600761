"""The workspace layout: where every stage reads and writes (docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Workspace:
        return cls(Path(root).resolve())

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def users(self) -> Path:
        return self.root / "data" / "users"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def foundation(self) -> Path:
        return self.models / "foundation"

    @property
    def evaluators(self) -> Path:
        return self.models / "evaluators"

    @property
    def stage1(self) -> Path:
        return self.models / "stage1"

    @property
    def dpo(self) -> Path:
        return self.models / "dpo"

    @property
    def candidates(self) -> Path:
        return self.root / "artifacts" / "candidates"

    @property
    def pairs(self) -> Path:
        return self.root / "artifacts" / "pairs"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def checkpoints(self) -> Path:
        """Resumable progress of running stages (not a DVC output)."""
        return self.root / ".pigeon" / "checkpoints"

    @property
    def timings(self) -> Path:
        """One JSON line per stage run: wall time and peak memory."""
        return self.root / ".pigeon" / "timings.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".pigeon" / "workspace.lock"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.checkpoints / stage
