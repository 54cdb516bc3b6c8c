"""The draft budget: how many positions one verification should spend.

A forward over k new positions costs more than one, by a factor that depends on the device,
the model and the batch (on a small CPU each row pays its own arithmetic; the measured curves
are in docs/speed-study.md), so every verified position must earn its cost.
Per step the planner:

1. estimates each draft node's probability of being accepted: the product, down its path,
   of P(accepted | parent accepted), learned online per (drafter, depth, bin of the node's
   share of its parent's evidence: neighbour counts, suffix frequencies) from every drafted
   tree, verified or not, scored in hindsight against the tokens the request goes on to emit;
2. keeps the k most probable nodes (p never grows along a path, so the top k form a
   subtree) for the k that maximises expected tokens per second
   (1 + sum of p) / (cost(k + 1) + overhead), cost(.) measured on this machine;
3. k = 0 means drafting does not pay right now: plain decoding. Where consulting the
   drafter costs a noticeable share of a step (CHEAP_CONSULT), it is consulted again after a
   back-off that doubles while drafts keep failing; the retry verifies a small probe so the
   estimates can recover when the text changes. A cheaper consult runs at every step:
   skipping it saves next to nothing and misses the drafts that come back, and its trees,
   even cut to the root, still teach the estimates in hindsight. A verified tree
   that accepts nothing backs off only when drafting itself is costly (COSTLY_DRAFT): the
   budget chose the tree knowing the risk, and its estimates learn from the miss.

The forward cost comes in as a CostModel (measured by dresd.decoding.calibration), timed
back to back over one context. Decoding's own steps cost somewhat more or less (other
contexts, accepted paths asking the lazy LM head for more rows, caches cooling between
steps), and at a low acceptance per position that decides whether drafting pays, so the
planner scales the calibrated costs by what its own verification steps measure: one running
factor for one-position steps and one for larger trees. Nothing here runs the model.
What each constant below trades, and the runs behind its value: docs/speed-study.md#budget-constants.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from dresd.decoding.tree import TokenTree, UnsettledTrees, offered_nodes, subtree

@dataclass
class CostModel:
    """Measured seconds of one verification forward over k positions (piecewise linear)."""

    positions: list[int]  # k values measured, ascending, starting at 1
    seconds: list[float]  # median forward time for each k
    context: int = 256  # cached tokens the forwards ran over
    key: str = ""  # what was measured (model, device, threads)

    def cost(self, k: int) -> float:
        """Seconds for a forward over k positions (linear between and beyond the measurements)."""
        ks, ts = self.positions, self.seconds
        if k <= ks[0]:
            return ts[0]
        for i in range(1, len(ks)):
            if k <= ks[i]:
                f = (k - ks[i - 1]) / (ks[i] - ks[i - 1])
                return ts[i - 1] + f * (ts[i] - ts[i - 1])
        slope = (ts[-1] - ts[-2]) / (ks[-1] - ks[-2]) if len(ks) > 1 else 0.0
        return ts[-1] + slope * (k - ks[-1])

    def relative(self) -> dict[int, float]:
        """Cost of each measured k as a multiple of a one-token forward."""
        return {k: t / self.seconds[0] for k, t in zip(self.positions, self.seconds)}

    def scaled(self, one: float, many: float) -> CostModel:
        """This model with the one-position cost times `one` and every larger k's times `many`."""
        seconds = [t * (one if k == 1 else many) for k, t in zip(self.positions, self.seconds)]
        return CostModel(self.positions, seconds, self.context, self.key)


# Drafting's share of a step; trades costly drafters' wasted retries against missed drafts; docs/speed-study.md#budget-constants.
COSTLY_DRAFT = 0.3
# A consult's share of a step; trades time on empty consults against missed drafts; docs/speed-study.md#budget-constants.
CHEAP_CONSULT = 0.05
# Weight of each step in the running factors; trades following the machine against noise; docs/speed-study.md#budget-constants.
STEP_SCALE_RATE = 0.05
# Clip on one step's ratio; trades ignoring preempted steps (GC) against real shifts; docs/speed-study.md#budget-constants.
STEP_SCALE_CLIP = (0.5, 2.0)
# Bin edges; trades cells that tell nodes apart against cells that learn fast; docs/speed-study.md#budget-constants.
SUPPORT_BINS = (0.1, 0.25, 0.5, 0.75)
# Scale limit of the stored counts (they grow by 1 / decay per update); trades rescale passes against float range; docs/speed-study.md#budget-constants.
RESCALE_AT = 1e100
# Depths from here share a cell; trades per-depth estimates against evidence per cell; docs/speed-study.md#budget-constants.
MAX_DEPTH_BUCKET = 8


def support_bin(conditional_support: float) -> int:
    """Which bin a node's support relative to its parent falls in (0 = weakest): how many
    edges lie below it."""
    return bisect_left(SUPPORT_BINS, conditional_support)


@dataclass
class AcceptanceModel:
    """Online estimate of P(node accepted | its parent accepted), per calibration cell.

    A cell is (drafter source, depth bucket, bin of the node's support relative to its
    parent's). p(node) is the product of these conditionals down the path, so it never
    exceeds its parent's. Counts decay so the estimate follows the text being generated.

    With `shrink`, a cell's prior is not a constant but its coarser cell's estimate:
    (source, depth, bin) leans on (source, bin), which leans on (source), which leans on the
    optimistic constant. Most cells of a tree are rare (deep nodes, nodes several sources
    agree on), and a constant prior keeps them near prior_rate long after the source has
    shown what nodes with that support are worth. The support bin comes before the depth
    because it tells more: a node most of its parent's evidence goes to is accepted far more
    often than a weak sibling, at any depth. Replayed on the same logged trees, this planner
    against the constant prior: docs/speed-study.md#acceptance-shrinkage.

    Sampled requests (temperature > 0) count in cells of their own: under speculative
    sampling a draft token is accepted with the target's probability of it, not whenever it
    is the argmax, so the same node is worth less than under greedy acceptance, and one
    decoder serves both kinds of request. A sampled cell's coarsest prior is the greedy
    (source)'s estimate, the evidence at hand before any sampled step.
    """

    # Optimistic; trades exploring new cells against wasted positions; docs/speed-study.md#budget-constants.
    prior_rate: float = 0.7
    # Weight of the prior; trades a steady start against a fast one; docs/speed-study.md#budget-constants.
    prior_weight: float = 2.0
    # Per recorded step; trades following the text against noise; docs/speed-study.md#budget-constants.
    decay: float = 0.995
    # Each cell's prior is its coarser cell's estimate (see above); False = the constant prior in every cell.
    shrink: bool = True
    # Counts as stored: a count is its stored figure over _scale, which grows by 1 / decay at
    # every update, so decaying every cell is one multiplication instead of a loop over cells.
    _offered: dict[tuple, float] = field(default_factory=lambda: defaultdict(float), repr=False)
    _accepted: dict[tuple, float] = field(default_factory=lambda: defaultdict(float), repr=False)
    _scale: float = field(default=1.0, repr=False)

    @property
    def offered(self) -> dict[tuple, float]:
        """Each cell's decayed count of nodes offered (a copy)."""
        return {key: count / self._scale for key, count in self._offered.items()}

    @property
    def accepted(self) -> dict[tuple, float]:
        """Each cell's decayed count of nodes accepted (a copy)."""
        return {key: count / self._scale for key, count in self._accepted.items()}

    @staticmethod
    def cell(tree: TokenTree, node: int) -> tuple:
        parent = tree.parents[node]
        cond = tree.weight[node] / tree.weight[parent] if tree.weight[parent] > 0 else 0.0
        return tree.source[node], min(tree.depths[node], MAX_DEPTH_BUCKET), support_bin(cond)

    def _levels(self, cell: tuple, sampled: bool = False) -> list[tuple]:
        """The cells an observation counts in, coarsest first (the cell itself last)."""
        source, _, support = cell
        if sampled:
            own = ("sampled", *cell)
            return [own] if not self.shrink else [("sampled", source), ("sampled", source, "bin", support), own]
        return [cell] if not self.shrink else [(source,), (source, "bin", support), cell]

    def rate(self, cell: tuple, sampled: bool = False) -> float:
        """P(accepted | parent accepted) in this cell, under sampling or greedy acceptance."""
        prior = self.prior_rate
        # A sampled cell's chain starts from the greedy source's estimate (read, never updated by it).
        chain = ([(cell[0],)] if sampled and self.shrink else []) + self._levels(cell, sampled)
        weight = self.prior_weight * self._scale  # the prior's weight in stored units
        for key in chain:
            prior = (self._accepted.get(key, 0.0) + prior * weight) / (self._offered.get(key, 0.0) + weight)
        return prior

    def node_probs(self, tree: TokenTree, sampled: bool = False) -> list[float]:
        """Estimated probability that each node is accepted (1.0 for the root)."""
        probs = [1.0] * len(tree)
        rates: dict[tuple, float] = {}  # a tree's nodes fall in a few cells: each cell's chain is read once
        for i in range(1, len(tree)):
            cell = self.cell(tree, i)
            if cell not in rates:
                rates[cell] = self.rate(cell, sampled)
            probs[i] = probs[tree.parents[i]] * rates[cell]
        return probs

    def update(self, tree: TokenTree, path: list[int], sampled: bool = False, open_end: bool = False) -> None:
        """Learn from one tree and the node path the target accepted in it. `open_end`: the
        text ran out at the path's last node (the request ended), so its children say nothing."""
        self._scale /= self.decay
        if self._scale > RESCALE_AT:  # back to plain counts before the figures leave float range
            for counts in (self._offered, self._accepted):
                for key in counts:
                    counts[key] /= self._scale
            self._scale = 1.0
        for i, accepted in offered_nodes(tree, path, open_end):
            for key in self._levels(self.cell(tree, i), sampled):
                self._offered[key] += self._scale
                self._accepted[key] += self._scale if accepted else 0.0


def likeliest_first(tree: TokenTree, probs: list[float]) -> list[int]:
    """The tree's draft nodes, likeliest first (shallower on ties): every prefix is a subtree."""
    return _by_likelihood(probs, tree.depths)


def _by_likelihood(probs: list[float], depths: list[int]) -> list[int]:
    return sorted(range(1, len(probs)), key=lambda i: (-probs[i], depths[i], i))


def select_nodes(probs: list[float], depths: list[int], cost: CostModel, max_nodes: int,
                 overhead_s: float = 0.0) -> tuple[list[int], float]:
    """Nodes to verify (root excluded) maximising expected tokens per second, and that rate.

    Candidates are taken in order of probability (shallower first on ties), which keeps
    every prefix of the order a subtree because a child is never likelier than its parent.
    """
    order = _by_likelihood(probs, depths)[: max(0, max_nodes - 1)]
    best_k, best_rate = 0, 1.0 / (cost.cost(1) + overhead_s)
    expected = 1.0
    for k, node in enumerate(order, start=1):
        expected += probs[node]
        rate = expected / (cost.cost(k + 1) + overhead_s)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return order[:best_k], best_rate


class DraftPlanner:
    """Per-decoder state of the budget: the cost model, acceptance calibration and back-off."""

    def __init__(self, cost: CostModel | None, max_nodes: int = 64, max_backoff: int = 32, probe_nodes: int = 3,
                 hindsight: bool = True):
        self.cost = cost  # None = no budget: verify every proposed node up to max_nodes
        # Learn from whole drafted trees against the emitted text (drafted); False = from the
        # verified nodes alone (what benchmarks/budget_replay.py compares it with).
        self.hindsight = hindsight
        self.max_nodes = max_nodes
        self.max_backoff = max_backoff
        self.acceptance = AcceptanceModel()
        self.probe_nodes = probe_nodes  # after a back-off, verify at least this many nodes: a retry that yields evidence
        self._failures = 0
        self._skip = 0
        self._probe = False
        self._probing = False
        self.retrieval_ema = 0.0  # seconds of drafting per step, part of each step's overhead
        # Measured / calibrated verification time, running averages: [one-position steps, larger trees].
        self.step_scale = [1.0, 1.0]
        self.sampled = False  # whether the current request samples (its acceptance counts in cells of its own)
        self._unsettled = UnsettledTrees()  # drafted trees the emitted text has not settled yet

    def begin(self, sampled: bool) -> None:
        """A request starts: whether it samples (temperature > 0) or decodes greedily."""
        for tree, _, path in self._unsettled.drain():  # the last request's text ended inside them
            self.acceptance.update(tree, path, self.sampled, open_end=True)
        self.sampled = sampled

    def drafted(self, tree: TokenTree) -> None:
        """A consult's whole tree, before any cut: the estimates learn from all of it once the
        request's next tokens are known (emitted). Learning only from verified nodes would
        leave the cells the planner rarely verifies (deep nodes, weak sources) at estimates
        too low to ever be verified, however often the text would have confirmed them. The
        emitted tokens are what acceptance would have given: under greedy acceptance the
        target's argmax, under speculative sampling a draw from the target's distribution, in
        which a drafted token appears with the probability that it would have been accepted."""
        if len(tree) > 1 and self.hindsight:
            self._unsettled.add(tree)

    def emitted(self, tokens: list[int]) -> None:
        """The tokens a step emitted (accepted drafts and the bonus, or one plain token): every
        drafted tree the text has now left, or followed to a leaf, teaches the estimates."""
        for tree, _, path in self._unsettled.emitted(tokens):
            self.acceptance.update(tree, path, self.sampled)

    def should_draft(self) -> bool:
        """False while backing off after drafts that did not pay."""
        if self._skip > 0:
            self._skip -= 1
            self._probe = self._skip == 0
            return False
        return True

    def plan(self, tree: TokenTree) -> TokenTree:
        """The part of `tree` worth verifying (the root alone when nothing pays)."""
        if len(tree) <= 1:
            return tree
        self.drafted(tree)
        if self.cost is None:
            # No budget: the max_nodes - 1 best-supported nodes (REST's top-64 tree). Support
            # never grows along a path, so these always form a subtree.
            order = sorted(range(1, len(tree)), key=lambda i: (-tree.weight[i], tree.depths[i], i))
            return subtree(tree, order[: self.max_nodes - 1])
        probs = self.acceptance.node_probs(tree, self.sampled)
        cost = self.cost.scaled(*self.step_scale)
        keep, _ = select_nodes(probs, tree.depths, cost, self.max_nodes, self.retrieval_ema)
        self._probing = self._probe and len(keep) < self.probe_nodes
        if self._probing:
            # The back-off's retry: drafts came back after steps without any, so the estimates
            # are stale; the likeliest few nodes say at once whether drafting pays again.
            keep = likeliest_first(tree, probs)[: self.probe_nodes]
        self._probe = False
        return subtree(tree, keep)

    def observe_step(self, positions: int, seconds: float) -> None:
        """Correct the calibrated cost with one measured verification over `positions` positions."""
        if self.cost is None or seconds <= 0:
            return
        lo, hi = STEP_SCALE_CLIP
        ratio = min(max(seconds / self.cost.cost(positions), lo), hi)
        i = int(positions > 1)
        self.step_scale[i] += STEP_SCALE_RATE * (ratio - self.step_scale[i])

    def record(self, tree: TokenTree, path: list[int], drafted: bool, retrieval_s: float) -> None:
        """Account for one step: calibration, retrieval cost and the back-off."""
        if not drafted:
            return
        self.retrieval_ema = 0.9 * self.retrieval_ema + 0.1 * retrieval_s if self.retrieval_ema else retrieval_s
        if not self.hindsight and len(tree) > 1:
            self.acceptance.update(tree, path, self.sampled)
        step = self.cost.cost(1) if self.cost is not None else 0.0
        if self.cost is None or (len(path) > 1 and not self._probing):  # as-published drafting never backs off
            self._failures = 0
        elif len(path) > 1:
            # A probe that paid off: let the updated estimates decide at the next step,
            # without resetting the back-off (the budget itself still chose not to draft).
            self._skip = 0
        elif not self._probing and retrieval_s < (COSTLY_DRAFT if len(tree) > 1 else CHEAP_CONSULT) * step:
            # A miss of a tree the budget chose (its estimates price misses in), or a cheap
            # consult with nothing worth verifying.
            self._failures = 0
        else:
            # A probe that missed, or drafting that costs a good part of a step for
            # nothing: wait 0, 1, 3, 7, ... steps.
            self._failures += 1
            self._skip = min(2 ** (self._failures - 1) - 1, self.max_backoff)
