"""``DataReport``: every segment, word and frame that preprocessing dropped or truncated."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List


class DataReport:
    """Counters grouped by section (``"all"``, ``"train"``, ``"valid"``, ``"test"``, …).

    ``add(section, key, n)`` increments; ``note(text)`` records a sentence (e.g. which files were
    read).  Nothing is dropped silently: every filter in :mod:`hdaf.data` calls ``add``.
    """

    def __init__(self, title: str = "data report"):
        self.title = title
        self.counts: "OrderedDict[str, OrderedDict[str, int]]" = OrderedDict()
        self.notes: List[str] = []
        self.examples: Dict[str, List[str]] = {}

    def add(self, section: str, key: str, n: int = 1, example: str = None) -> None:
        sec = self.counts.setdefault(section, OrderedDict())
        sec[key] = sec.get(key, 0) + int(n)
        if example is not None and n:
            ex = self.examples.setdefault(f"{section}/{key}", [])
            if len(ex) < 5:
                ex.append(example)

    def get(self, section: str, key: str) -> int:
        return self.counts.get(section, {}).get(key, 0)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict:
        return {"title": self.title, "counts": {k: dict(v) for k, v in self.counts.items()},
                "notes": list(self.notes), "examples": dict(self.examples)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        r = cls(d.get("title", "data report"))
        for sec, kv in d.get("counts", {}).items():
            for k, v in kv.items():
                r.add(sec, k, v)
        r.notes = list(d.get("notes", []))
        r.examples = dict(d.get("examples", {}))
        return r

    def summary(self) -> str:
        lines = [f"== {self.title} =="]
        for note in self.notes:
            lines.append(f"  * {note}")
        for sec, kv in self.counts.items():
            lines.append(f"  [{sec}]")
            width = max((len(k) for k in kv), default=0)
            for k, v in kv.items():
                ex = self.examples.get(f"{sec}/{k}")
                tail = f"   e.g. {', '.join(ex[:3])}" if ex and v else ""
                lines.append(f"    {k:<{width}}  {v}{tail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def save(self, folder: str, stem: str = "data_report") -> Dict[str, str]:
        os.makedirs(folder, exist_ok=True)
        pj, pt = os.path.join(folder, stem + ".json"), os.path.join(folder, stem + ".txt")
        with open(pj, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        with open(pt, "w") as f:
            f.write(self.summary() + "\n")
        return {"json": pj, "txt": pt}
