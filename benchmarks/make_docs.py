"""Render docs/benchmarks.md from benchmarks/results/*.json (the latest run of each benchmark).

    .venv/bin/python benchmarks/make_docs.py                          # regenerate the page
    .venv/bin/python benchmarks/make_docs.py --add runs/bench/full/spec_bench.json
    .venv/bin/python benchmarks/make_docs.py --check                  # exit 1 if the page is stale

`--add` makes a run the latest of its benchmark (its images come along) before rendering.
Every benchmark script writes such a json beside its markdown report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dresd.evaluation.results import add_result, load_results, render_doc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--add", nargs="*", default=[], metavar="RUN.json", help="runs to make the latest of their benchmark")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of <benchmark>.json files")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the page to write")
    p.add_argument("--check", action="store_true", help="only check that the page matches the results")
    args = p.parse_args(argv)
    for run in args.add:
        print(f"added {add_result(run, args.results)}")
    page = render_doc(load_results(args.results))
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != page:
            print(f"{out} is stale: run .venv/bin/python benchmarks/make_docs.py", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.write_text(page)
    print(f"wrote {out} ({len(load_results(args.results))} benchmarks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
