"""What a batch decode run did (pipelines/decode.py): counts by outcome, drafting counters,
and the summary table the job prints. Filled from the actors' per-chunk receipts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DecodeReport:
    """What one run did; `lines()` is the summary table."""

    output: str
    rows_in: int = 0
    decoded: int = 0  # rows decoded by this run
    skipped: int = 0  # rows decoded by an earlier run (their part was reused)
    rejected: Counter = field(default_factory=Counter)  # by reason (this run's and reused parts')
    failed: Counter = field(default_factory=Counter)  # by reason; their chunks stay unfinished
    chunks: int = 0
    computed: list[int] = field(default_factory=list)  # chunk ids written by this run
    reused: int = 0
    replaced: int = 0  # parts found with another key (other rows or settings), recomputed
    new_tokens: int = 0
    accepted: int = 0  # draft tokens accepted (speculative methods)
    drafted: int = 0  # draft positions verified
    calls: int = 0  # target forwards after prefill, summed over sequences
    gen_s: float = 0.0  # actor seconds in generate_batch, summed
    stage_s: float = 0.0  # wall seconds of the Ray stage
    corpus: str | None = None
    corpus_records: int = 0
    corpus_empty: int = 0
    removed: list[str] = field(default_factory=list)  # parts outside this run's plan, removed

    def lines(self) -> list[str]:
        rej, fail = sum(self.rejected.values()), sum(self.failed.values())
        out = [f"decode summary: {self.output} ({self.chunks} chunks: {len(self.computed)} computed, "
               f"{self.reused} reused, {self.replaced} replaced as stale, "
               f"{self.chunks - len(self.computed) - self.reused} failed)"]
        table = [("rows in", self.rows_in), ("decoded now", self.decoded),
                 ("skipped (already finished)", self.skipped), ("rejected", rej)]
        table += [(f"  {k}", v) for k, v in sorted(self.rejected.items())]
        table += [("failed", fail)] + [(f"  {k}", v) for k, v in sorted(self.failed.items())]
        out += [f"  {name:<30}{value:>9}" for name, value in table]
        ok = "ok" if self.rows_in == self.decoded + self.skipped + rej + fail else "MISMATCH"
        out.append(f"  in = decoded + skipped + rejected + failed: {self.rows_in} = {self.decoded} + "
                   f"{self.skipped} + {rej} + {fail} ({ok})")
        tps = self.new_tokens / self.gen_s if self.gen_s else 0.0
        wall_tps = self.new_tokens / self.stage_s if self.stage_s else 0.0
        out.append(f"  new tokens {self.new_tokens}: {tps:.1f} tokens/s over {self.gen_s:.1f} s of decoding, "
                   f"{wall_tps:.1f} tokens/s over the stage's {self.stage_s:.1f} s wall")
        if self.drafted:
            out.append(f"  drafting: acceptance {self.accepted / self.drafted:.3f} ({self.accepted} of "
                       f"{self.drafted} drafted), mean accepted tokens per call per sequence "
                       f"{self.new_tokens / max(1, self.calls):.2f}")
        if self.removed:
            out.append(f"  removed {len(self.removed)} part(s) outside this plan (an earlier limit or chunk_rows): "
                       + ", ".join(self.removed[:5]) + (" ..." if len(self.removed) > 5 else ""))
        if self.corpus:
            out.append(f"  id corpus: {self.corpus} ({self.corpus_records} records, "
                       f"{self.corpus_empty} empty responses left out)")
        return out

    def add(self, receipt: dict) -> None:
        """Count one chunk's receipt (DecodeChunks) and print its line."""
        r = receipt
        done, written = int(r["done"]), bool(r["written"])
        self.decoded += done if written else 0
        self.new_tokens += int(r["new_tokens"])
        self.gen_s += float(r["gen_s"])
        self.accepted += int(r["accepted"])
        self.drafted += int(r["drafted"])
        self.calls += int(r["calls"])
        self.rejected.update(json.loads(r["rejects"]))
        failed = Counter(json.loads(r["failed"]))
        if failed:  # the chunk's decoded rows are thrown away too: they are redone on rerun
            failed["unfinished_chunk"] += done
        self.failed.update(failed)
        if written:
            self.computed.append(int(r["chunk"]))
        print(f"chunk {r['chunk']}: {done} rows, {r['new_tokens']} tokens in {r['gen_s']:.1f} s"
              + ("" if written else f" NOT written ({dict(failed)})"), flush=True)
