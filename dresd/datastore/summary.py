"""A published version described for people: what `dresd datastore show` prints.

The manifest holds everything, but as nested json; an operator asks a few questions of it
(which model, which version and from what, how big, how it searches, how good the index is),
and this answers them in that order. `--json` still prints the manifest as it is.
"""

from __future__ import annotations

from typing import Any


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(manifest: dict[str, Any], deleted_keys: int = 0, current: str | None = None) -> list[str]:
    """Lines describing one version's manifest; `deleted_keys` counts its tombstones."""
    m, counts = manifest, manifest.get("counts", {})
    model = m.get("model", {})
    version = m.get("version", "?")
    tag = " (CURRENT)" if current == version else ""
    change = m.get("change") or {}
    origin = (f"{change.get('kind', 'change')} on {m['parent']}" if m.get("parent")
              else "a full build")
    files = m.get("files", {})
    total = sum(f.get("bytes", 0) for f in files.values())
    tokens = counts.get("tokens") or 0
    index = m.get("index", {})
    params = index.get("params", {})
    layout = index.get("factory", "?") + (", on-disk lists (index.ivfdata)" if params.get("on_disk") else "")
    fmt = m.get("prompt_format", {})
    lines = [
        f"version   {version}{tag}, created {m.get('created_at', '?')}, format {m.get('format_version', '?')}",
        f"made by   {origin}",
        f"model     {model.get('name', '?')} (fingerprint {str(model.get('fingerprint', '?'))[:12]})",
        f"prompts   format {fmt.get('name', '?')} (fingerprint {str(fmt.get('fingerprint', '?'))[:12]}), "
        f"values of {m.get('value_len', '?')} tokens",
        f"contents  {_count(counts.get('records', '?'))} records, {_count(tokens)} tokens, "
        f"{_count(counts.get('keys', '?'))} keys"
        + (f", {_count(deleted_keys)} deleted (until compaction)" if deleted_keys else ""),
        f"size      {_bytes(total)} in {len(files)} files"
        + (f", {total / tokens:.1f} B per token" if tokens else ""),
        f"index     {layout}, {params.get('dim', '?')} dims",
    ]
    check = m.get("check") or {}
    if check:
        lines.append("check     " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in check.items()))
    rejected = counts.get("rejected") or {}
    if rejected:
        lines.append("rejected  " + ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())))
    return lines
