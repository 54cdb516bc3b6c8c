"""Planning a batched step: how many positions each sequence may verify at this load.

A batched verification pads every row to the widest tree, so its cost is a function of the
batch size b and of the positions per row k: T(b, k), measured per model and device
(dresd.decoding.calibration.calibrate_batch_cost) and interpolated between measurements.
What a drafted position is worth depends on the load: on a small CPU each position pays its
own arithmetic, so at batch 16 a second position per row nearly doubles the step; on a GPU
T(b, k) stays flat until the device is compute-bound, and drafting pays at far larger
batches. (vLLM maps batch-size ranges to a number of speculative tokens for this reason.)

Per step the planner picks one width k for the whole batch: every row verifies its k - 1
likeliest draft nodes, ordered by its own acceptance estimates (dresd.decoding.budget's
AcceptanceModel; a prefix of that order is a subtree), and k maximises the batch's expected
tokens per second

    sum over rows of (1 + the row's top k - 1 acceptance probabilities) / (T(b, k) + drafting)

k = 1 is plain batched decoding: drafting does not pay at this load. One width per step is
what the padded layout makes optimal: a row verifying fewer nodes than the widest saves
nothing. The calibrated costs are scaled by what this batch's own steps measure: a running
factor for every step (the machine's load, the contexts' length, cold caches move all widths
alike) and, on top of it, one for wider steps. Wider steps are rare where drafting seldom
pays, so a factor of their own would lag the machine by hundreds of steps and price a wide
step at what it cost under another load: the relative factor carries only what wide steps
cost beyond the common one. Both are running averages (STEP_SCALE_RATE): a factor set by one
step would let a slow first wide step (a cold cache) price every later one out of reach, and
with no wide step verified it could never come back down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dresd.decoding.budget import (CHEAP_CONSULT, STEP_SCALE_CLIP, STEP_SCALE_RATE, CostModel, DraftPlanner,
                                   likeliest_first)
from dresd.decoding.tree import TokenTree, subtree


@dataclass
class BatchCostModel:
    """Measured seconds of one batched verification forward: rows x positions per row."""

    batches: list[int]  # batch sizes measured, ascending, starting at 1
    positions: list[int]  # positions per row measured, ascending, starting at 1
    seconds: list[list[float]]  # seconds[i][j]: median forward over batches[i] rows of positions[j] each
    context: int = 256  # cached tokens per row the forwards ran over
    key: str = ""  # what was measured (model, device, threads)

    def __post_init__(self):
        if len(self.seconds) != len(self.batches) or any(len(r) != len(self.positions) for r in self.seconds):
            raise ValueError(f"seconds must be {len(self.batches)} rows of {len(self.positions)} measurements")
        self._rows = [CostModel(self.positions, row, self.context, self.key) for row in self.seconds]

    @classmethod
    def from_single(cls, cost: CostModel) -> BatchCostModel:
        """A batch model from a one-sequence curve alone, assuming every row pays its own
        positions (T(b, k) = T(1, b * k)): a CPU's behaviour, pessimistic on a GPU."""
        batches = [1, 2, 4, 8, 16]
        return cls(batches, list(cost.positions), [[cost.cost(b * k) for k in cost.positions] for b in batches],
                   cost.context, cost.key + "|from-single")

    def cost(self, rows: int, k: int) -> float:
        """Seconds for a forward over `rows` rows of k positions (linear between and beyond measurements)."""
        if len(self.batches) == 1:
            return self._rows[0].cost(rows * k)
        across = CostModel(self.batches, [row.cost(k) for row in self._rows])
        return across.cost(rows)

    def at_batch(self, rows: int) -> CostModel:
        """The one-row-width curve at this batch size: T(rows, k) for each measured k."""
        return CostModel(list(self.positions), [self.cost(rows, k) for k in self.positions], self.context, self.key)

    def single(self) -> CostModel:
        """The one-sequence curve (batch 1), what dresd.decoding.loop's planner reads."""
        return self._rows[0] if self.batches[0] == 1 else self.at_batch(1)


def select_width(row_probs: list[list[float]], cost: Callable[[int], float], max_width: int,
                 overhead_s: float = 0.0) -> tuple[int, float]:
    """The positions per row k (1 = no drafts) maximising expected tokens per second, and that rate.

    `row_probs[r]` are row r's candidate nodes' acceptance probabilities, in the order the
    row would verify them (descending); `cost(k)` is the batch's forward over k positions per row.
    """
    deepest = min(max_width, 1 + max((len(p) for p in row_probs), default=0))
    expected = float(len(row_probs))
    best_k, best_rate = 1, expected / (cost(1) + overhead_s)
    for k in range(2, deepest + 1):
        expected += sum(p[k - 2] for p in row_probs if len(p) >= k - 1)
        rate = expected / (cost(k) + overhead_s)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate


def prior_gain(row_probs: list[list[float]], cost: Callable[[int], float], overhead_s: float = 0.0) -> float:
    """How many times plain decoding's tokens/s a width of at most 2 would give with these
    rows' likeliest nodes (1.0: a width of 2 does not pay): what estimates that recovered to
    their prior would be worth at this load."""
    return select_width(row_probs, cost, 2, overhead_s)[1] * (cost(1) + overhead_s) / len(row_probs)


# Most steps the batch goes without consulting its drafters after widths of 1 in a row;
# trades drafting time wasted at a load where drafts do not pay against drafts missed when they would.
MAX_BATCH_BACKOFF = 32
# Consulted steps at width 1 with drafts on the table before a probe; trades wide steps spent on
# evidence against estimates that stay stale (the interval doubles while probes lead nowhere).
PROBE_AFTER = 8
# Longest interval between probes, in consulted steps.
MAX_PROBE_INTERVAL = 256
# Least gain in tokens/s that drafts at the estimates' prior would bring at this load for the
# batch to probe, or to consult its drafters at every step however cheap the consults; trades
# probes and consults near break-even, which cannot buy back their cost, against drafts missed.
MIN_PRIOR_GAIN = 0.1


class BatchPlanner:
    """The batch's share of the draft budget: one width per step, from T(b, k) and the rows' estimates.

    When drafting does not pay at this load (the chosen width is 1), consulting every row's
    drafter each step still costs its time; where that time is a noticeable share of a step
    (CHEAP_CONSULT, as for one sequence), or where drafts as likely as the estimates' prior
    would not pay by MIN_PRIOR_GAIN at this load (a small CPU at batch 16), the batch then
    skips consults for 0, 1, 3, 7, ... steps while widths stay at 1, and consults every step
    again once a width above 1 pays.

    A width of 1 verifies no node. The rows' estimates still learn from every tree they
    draft, in hindsight (DraftPlanner.drafted), but the wider steps' cost factor learns only
    from wide steps, and a factor gone stale after a busy spell can keep every width at 1
    for good. After PROBE_AFTER consulted steps in a row at width 1 with drafts on the table, the batch
    verifies each drafting row's likeliest node (width 2), then waits twice as long before
    the next probe unless a width above 1 pays meanwhile. It probes only where nodes as
    likely as the estimates' prior would pay at this load by MIN_PRIOR_GAIN: elsewhere (a
    small CPU at batch 16, where a second position nearly doubles a step) no evidence could
    make drafting pay much, and a probe is a wide step bought for next to nothing.
    """

    def __init__(self, cost: BatchCostModel, max_width: int = 64):
        self.cost = cost
        self.max_width = max_width  # most positions a row may verify (root included)
        # Measured / calibrated forward time, running averages: [every step's factor, wider
        # steps' factor on top of it].
        self.step_scale = [1.0, 1.0]
        self._shares: dict[int, CostModel] = {}
        self._unpaid = 0  # drafted steps in a row whose chosen width was 1
        self._skip = 0  # steps left without consulting
        self._quiet = 0  # consulted steps in a row planned to width 1 with drafts on the table
        self._probe_at = PROBE_AFTER  # consulted quiet steps before the next probe
        self.probes = 0  # probes made (what a report or test reads)
        self._promising = True  # whether drafts at the prior's rate paid by MIN_PRIOR_GAIN at the last plan's load

    def adopt(self, step_scale: list[float]) -> None:
        """Start from another planner's factors (a decoder replacing one over the same model)."""
        self.step_scale = list(step_scale)

    def should_draft(self) -> bool:
        """False while backing off after consults whose drafts did not pay at this load."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def record_width(self, width: int, rows: int = 1, drafting_s: float | None = None) -> None:
        """Account for a step whose drafts were planned to `width` positions per row over
        `rows` rows, its consults having taken `drafting_s` seconds in all (None: unknown)."""
        cheap = drafting_s is not None and drafting_s < CHEAP_CONSULT * self.step_cost(rows, 1)
        if width > 1 or (cheap and self._promising):
            # A width that paid, or consults too cheap to skip at a load where drafts can pay:
            # skipping them saves next to nothing and misses the drafts that come back at the
            # next step (a row's suffix tree proposes nothing on one step and a long match on the next).
            self._unpaid = self._skip = 0
            return
        self._unpaid += 1
        self._skip = min(2 ** (self._unpaid - 1) - 1, MAX_BATCH_BACKOFF)

    def step_cost(self, rows: int, k: int) -> float:
        """Expected seconds of this batch's forward: calibrated, scaled by what steps measured."""
        return self.cost.cost(rows, k) * self.step_scale[0] * (self.step_scale[1] if k > 1 else 1.0)

    def row_share(self, rows: int) -> CostModel:
        """One row's share of a step at this batch size, T(rows, k) / rows: what a row's own
        DraftPlanner weighs its drafting time against when deciding to back off."""
        if rows not in self._shares:
            at = self.cost.at_batch(rows)
            self._shares[rows] = CostModel(at.positions, [t / rows for t in at.seconds], at.context, at.key)
        return self._shares[rows]

    def plan(self, trees: dict[int, TokenTree], planners: dict[int, DraftPlanner],
             overhead_s: float = 0.0) -> tuple[dict[int, TokenTree], int]:
        """Each row's tree cut to the chosen width, and that width (positions per row)."""
        orders, probs = {}, []
        for slot, tree in trees.items():
            p = planners[slot].acceptance.node_probs(tree, planners[slot].sampled)
            orders[slot] = likeliest_first(tree, p)[: self.max_width - 1]
            probs.append([p[i] for i in orders[slot]])
        cost = lambda w: self.step_cost(len(trees), w)  # noqa: E731
        k, _ = select_width(probs, cost, self.max_width, overhead_s)
        prior = [planners[slot].acceptance.prior_rate for slot in trees]
        self._promising = prior_gain([[p] for p in prior], cost, overhead_s) >= 1 + MIN_PRIOR_GAIN
        if k > 1:
            self._quiet, self._probe_at = 0, PROBE_AFTER
        elif any(probs):
            self._quiet += 1
            drafting = [[p] if row else [] for p, row in zip(prior, probs)]
            if self._quiet >= self._probe_at and prior_gain(drafting, cost, overhead_s) >= 1 + MIN_PRIOR_GAIN:
                k, self._quiet = 2, 0
                self._probe_at = min(2 * self._probe_at, MAX_PROBE_INTERVAL)
                self.probes += 1
        return {slot: subtree(tree, orders[slot][: k - 1]) for slot, tree in trees.items()}, k

    def observe_step(self, rows: int, k: int, seconds: float) -> None:
        """Correct the calibrated cost with one measured forward over `rows` x `k` positions:
        a one-position step moves the common factor, a wider one its own factor on top of it."""
        if seconds <= 0:
            return
        lo, hi = STEP_SCALE_CLIP
        i = int(k > 1)
        expected = self.cost.cost(rows, k) * (self.step_scale[0] if i else 1.0)
        ratio = min(max(seconds / expected, lo), hi)
        self.step_scale[i] += STEP_SCALE_RATE * (ratio - self.step_scale[i])
