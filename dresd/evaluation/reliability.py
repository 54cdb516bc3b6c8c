"""Calibration of the draft planner: predicted against observed acceptance of verified nodes.

The planner prices every draft node with `DraftPlanner.acceptance.node_probs(tree)`: the
probability that the target accepts it. A benchmark run wraps each decoder's planner in a
RecordingPlanner, which leaves planning and learning to the planner and logs, for every
node it verified, (source, depth, predicted p taken before the step's outcome is learnt,
accepted or not). Counts are kept per (source, depth, p bin), so a request's log is a few
dozen numbers that sum across requests, and the report draws a reliability diagram per
source and a table of mean predicted against observed acceptance per depth.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

P_BINS = 10  # equal-width bins of predicted p in the diagrams
DEPTH_CAP = 8  # depths from here share one row ("8+"), as the planner's cells share them
DEPTH_GROUPS = ((1, 1), (2, 2), (3, 4), (5, 1 << 30))  # one line per group in a source's diagram
TOP_SOURCES = 8  # sources drawn and tabled per depth, most verified nodes first (agreeing drafters make many)


def depth_group_label(lo: int, hi: int) -> str:
    """"1", "3-4", "5+": how tables and diagrams name a DEPTH_GROUPS entry."""
    return str(lo) if lo == hi else f"{lo}+" if hi > DEPTH_CAP else f"{lo}-{hi}"


def p_bin(p: float) -> int:
    return min(int(p * P_BINS), P_BINS - 1)


class ReliabilityLog:
    """Verified nodes counted per (source, depth, p bin): [nodes, sum of predicted p, accepted]."""

    def __init__(self):
        self.cells: dict[tuple[str, int, int], list[float]] = defaultdict(lambda: [0, 0.0, 0])

    def add(self, source: str, depth: int, predicted: float, accepted: bool) -> None:
        cell = self.cells[(source or "unnamed", int(depth), p_bin(predicted))]
        cell[0] += 1
        cell[1] += float(predicted)
        cell[2] += int(accepted)

    def rows(self) -> list[list]:
        """JSON-ready: [source, depth, p bin, nodes, sum of predicted p, accepted], sorted."""
        return [[s, d, b, int(n), round(sp, 6), int(a)] for (s, d, b), (n, sp, a) in sorted(self.cells.items())]

    def take(self) -> list[list]:
        """rows(), then start afresh (one request's log)."""
        out = self.rows()
        self.cells.clear()
        return out

    @classmethod
    def from_rows(cls, rows: list[list]) -> "ReliabilityLog":
        """The log back from rows(); several requests' rows add up."""
        log = cls()
        for s, d, b, n, sp, a in rows:
            cell = log.cells[(s, int(d), int(b))]
            cell[0] += n
            cell[1] += sp
            cell[2] += a
        return log


class RecordingPlanner:
    """A DraftPlanner that also logs its verified nodes; every other call goes to the planner."""

    def __init__(self, planner, log: ReliabilityLog):
        self._planner = planner
        self.log = log
        self._planned = None  # (the tree plan() returned, its node probabilities)

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def plan(self, tree, *args, **kwargs):
        planned = self._planner.plan(tree, *args, **kwargs)
        # The predictions the planner holds now, before record() learns this step's outcome.
        # A subtree keeps each node's source, depth and weight, so these are the values it priced.
        self._planned = (planned, self._planner.acceptance.node_probs(planned, self._planner.sampled))
        return planned

    def record(self, tree, path, *args, **kwargs):
        if self._planned is not None and self._planned[0] is tree:
            probs, accepted = self._planned[1], set(path)
            for i in range(1, len(tree)):
                self.log.add(tree.source[i], tree.depths[i], probs[i], i in accepted)
        self._planned = None
        return self._planner.record(tree, path, *args, **kwargs)


def watch(decoder, log: ReliabilityLog) -> None:
    """Log `decoder`'s verified nodes into `log` from now on (once per decoder)."""
    if isinstance(decoder.planner, RecordingPlanner):
        decoder.planner.log = log
    else:
        decoder.planner = RecordingPlanner(decoder.planner, log)


# ----------------------------------------------------------------------------- report


def _depth_label(depth: int) -> str:
    return f"{DEPTH_CAP}+" if depth >= DEPTH_CAP else str(depth)


def depth_table(log: ReliabilityLog, sources: list[str] | None = None) -> list[list[str]]:
    """Rows [source, depth, nodes, mean predicted, observed, observed - predicted], per source
    (all, or those in `sources`) and depth."""
    sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for (s, d, _), (n, sp, a) in log.cells.items():
        if sources is not None and s not in sources:
            continue
        cell = sums[(s, min(d, DEPTH_CAP))]
        cell[0] += n
        cell[1] += sp
        cell[2] += a
    return [[s, _depth_label(d), str(int(n)), f"{sp / n:.3f}", f"{a / n:.3f}", f"{(a - sp) / n:+.3f}"]
            for (s, d), (n, sp, a) in sorted(sums.items()) if n]


def source_totals(log: ReliabilityLog) -> dict[str, tuple[int, float, float]]:
    """Per source: (nodes, mean predicted, observed), sources with most nodes first."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for (s, _, _), (n, sp, a) in log.cells.items():
        sums[s][0] += n
        sums[s][1] += sp
        sums[s][2] += a
    ordered = sorted(sums.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return {s: (int(n), sp / n, a / n) for s, (n, sp, a) in ordered if n}


def plot_reliability(log: ReliabilityLog, path: Path, max_sources: int = TOP_SOURCES, nodes: str = "verified nodes",
                     predicted: str = "predicted P(accepted)") -> bool:
    """A reliability diagram per source (lines per depth group); False when nothing was logged.
    `nodes` and `predicted` name what the log counted (titles and the x axis)."""
    sources = list(source_totals(log))[:max_sources]
    if not sources:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(sources))
    rows = -(-len(sources) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(sources):]:
        ax.set_visible(False)
    for ax, source in zip(axes.flat, sources):
        groups = [("all", 1, 1 << 30)] + [(f"depth {depth_group_label(lo, hi)}", lo, hi) for lo, hi in DEPTH_GROUPS]
        for label, lo, hi in groups:
            bins: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0])
            for (s, d, b), (n, sp, a) in log.cells.items():
                if s == source and lo <= d <= hi:
                    bins[b][0] += n
                    bins[b][1] += sp
                    bins[b][2] += a
            pts = [(sp / n, a / n, n) for _, (n, sp, a) in sorted(bins.items()) if n]
            if not pts:
                continue
            style = dict(color="black", lw=2) if label == "all" else dict(lw=1, alpha=0.8)
            ax.plot([p for p, _, _ in pts], [o for _, o, _ in pts], marker="o", ms=3, label=label, **style)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(predicted)
        ax.set_ylabel("observed share accepted")
        ax.set_title(f"{source}: {source_totals(log)[source][0]} {nodes}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pooled(logs: dict[str, ReliabilityLog]) -> ReliabilityLog:
    """One log summing several (e.g. every method's)."""
    return ReliabilityLog.from_rows([row for log in logs.values() for row in log.rows()])


def report_lines(logs: dict[str, ReliabilityLog], image: str | None) -> list[str]:
    """The report's calibration section from each method's log: per method and source, per
    source and depth (pooled over methods), and the diagram."""
    lines = ["## Calibration: predicted against observed acceptance", "",
             "Every node a planner verified, over all evaluation sets: the planner's predicted probability "
             "that the target accepts it (DraftPlanner.acceptance.node_probs, taken before the step's outcome is "
             "learnt) against whether it was accepted. Observed above predicted: the planner under-spends there; "
             "below: it over-spends. Methods without the budget verify nodes the planner did not choose, "
             "priced all the same.", ""]
    rows = [(m, s, t) for m, log in logs.items() for s, t in source_totals(log).items()]
    if not rows:
        return lines + ["No drafted node was verified in this run.", ""]
    lines += ["| method | source | verified nodes | mean predicted | observed |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {s} | {n} | {p:.3f} | {o:.3f} |" for m, s, (n, p, o) in rows]
    top = list(source_totals(pooled(logs)))[:TOP_SOURCES]
    lines += ["", f"Pooled over methods, the {len(top)} sources with most verified nodes (drawn below):", "",
              "| source | depth | verified nodes | mean predicted | observed | observed - predicted |",
              "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in depth_table(pooled(logs), top)]
    lines.append("")
    if image:
        lines += [f"![reliability]({image})", ""]
    return lines
