"""A decode run's report (pipelines/decode_report.py): receipts counted by outcome."""

from __future__ import annotations

import json

from pipelines.decode_report import DecodeReport


def _receipt(chunk, done, written=True, failed=None, rejects=None):
    return {"chunk": chunk, "written": written, "done": done, "new_tokens": 10 * done, "gen_s": 1.0,
            "rejects": json.dumps(rejects or {}), "failed": json.dumps(failed or {}), "accepted": 3, "drafted": 6,
            "calls": 5}


def test_receipts_add_up_and_a_failed_chunk_counts_its_rows_as_unfinished(capsys):
    report = DecodeReport(output="out", rows_in=9, chunks=3)
    report.add(_receipt(2, 3, rejects={"too_long": 1}))
    report.add(_receipt(0, 2, written=False, failed={"error:OSError": 1}))
    report.add(_receipt(1, 2))
    assert report.computed == [2, 1] and report.decoded == 5
    assert report.failed == {"error:OSError": 1, "unfinished_chunk": 2} and report.rejected == {"too_long": 1}
    assert (report.accepted, report.drafted, report.calls) == (9, 18, 15)
    assert "chunk 0: 2 rows, 20 tokens in 1.0 s NOT written" in capsys.readouterr().out
    text = "\n".join(report.lines())
    assert "in = decoded + skipped + rejected + failed: 9 = 5 + 0 + 1 + 3 (ok)" in text
