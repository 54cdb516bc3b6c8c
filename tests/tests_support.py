"""Helpers shared by several test modules (imported by name; tests/ is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_small_corpus(folder: Path) -> tuple[Path, list[dict]]:
    """A jsonl corpus of 40 good prompt/response rows with 5 bad rows mixed in.

    Bad rows (1-based line numbers): 6 missing field, 10 bad JSON, 13 empty text,
    16 not a string, 21 prompt longer than max_tokens=256.
    """
    good = [{"prompt": f"question {i}?", "response": f"answer {i}: " + "abc " * (i % 7 + 3)} for i in range(40)]
    lines = [json.dumps(r) for r in good]
    lines.insert(5, json.dumps({"prompt": "no response here"}))
    lines.insert(9, "{not json")
    lines.insert(12, json.dumps({"prompt": "p", "response": "   "}))
    lines.insert(15, json.dumps({"prompt": "p", "response": 7}))
    lines.insert(20, json.dumps({"prompt": "x" * 600, "response": "too long"}))
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good
