"""Batched speculative decoding: many sequences per forward, each with its own draft tree.

Every row of the batch carries a token tree rooted at its pending token (just the root when
it has no drafts); one forward verifies all of them, with per-row positions and a 4-D mask
that lets each node see its own row's committed entries and its tree ancestors only. Each
row then accepts its own path (greedy, or speculative sampling with its own generator),
exactly as `dresd.decoding.loop.SpeculativeDecoder` does for one sequence.

The shared KV cache is laid out so that column j of a row holds that row's position j: a
row's committed entries fill columns [0, committed) and anything after them in the view is
masked. A step writes each row's tree right after the row's own entries, so an accepted
path in node order (a lone root above all: every row of a step without drafts) is already
in place and only accepted nodes from elsewhere in a tree are moved (dresd.decoding.row_cache);
rows advance by different amounts without padding that grows or a compaction pass. A row that finishes
frees its slot between steps, and a waiting request joins there: its prompt is prefilled
on its own (no padded position is computed) and written into the slot.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from dresd.config import SpeculativeConfig
from dresd.decoding.acceptance import acceptor
from dresd.decoding.batch import PADDED_PREFILL_DEVICES
from dresd.decoding.batch_plan import BatchCostModel, BatchPlanner
from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.decoding.kv_cache import GrowingCache
from dresd.decoding.row_cache import RowCache, batch_inputs, padded_prefill
from dresd.decoding.loop import Generation
from dresd.decoding.metrics import DecodeMetrics
from dresd.decoding.tree import TokenTree, build_tree, greedy_accept
from dresd.decoding.verify import LazyGreedyTokens, forward, verify_token_tree
from dresd.drafters import Drafter, DraftRequest

if TYPE_CHECKING:
    from dresd.config import SamplingParams


@dataclass
class BatchRequest:
    """One sequence to decode in a batch."""

    prompt_ids: list[int]  # the laid-out prompt (at least one token)
    max_new_tokens: int  # the most new tokens (the model's context may cut it shorter)
    sampling: SamplingParams | None = None  # None or temperature 0: greedy


@dataclass
class _Row:
    """A slot's sequence while it decodes."""

    index: int  # the request's id (BatchedSpeculativeDecoder.submit)
    budget: int  # new tokens it may still emit in all
    context: list[int]  # prompt + emitted tokens
    committed: int  # entries in the cache: every context token but the pending last one
    query: torch.Tensor | None  # the hidden state that predicted the pending token
    accept: Callable | None  # speculative sampling's acceptor (None: greedy)
    metrics: DecodeMetrics
    started: float
    out: list[int] = field(default_factory=list)
    fresh_keys: list[torch.Tensor] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)  # (from, to) columns of accepted nodes out of place


class BatchedSpeculativeDecoder:
    """Decode many requests at once, `max_batch` at a time, each with its own drafts.

    `drafter_factory()` makes one drafter per slot (drafters keep per-request state between
    `begin` and `end`); a slot keeps its drafter and draft planner across the requests it
    serves, so the planner's calibration carries over as it does in the one-sequence loop.
    Greedy rows are token-identical to `SpeculativeDecoder` given the same trees, up to
    float near-ties between batched and single-row arithmetic; sampled rows use the same
    lossless acceptance with a generator seeded per request.
    """

    def __init__(self, model, eos_id: int, max_context: int, spec: SpeculativeConfig,
                 drafter_factory: Callable[[], Drafter | None] | None = None,
                 cost: BatchCostModel | CostModel | None = None, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if spec.method != "greedy" and drafter_factory is None:
            raise ValueError(f"method {spec.method!r} needs a drafter factory")
        if spec.verify != "tree":
            raise ValueError(f"batched decoding verifies trees; verify={spec.verify!r} is for one sequence")
        self.model, self.eos_id, self.max_context, self.spec = model, eos_id, max_context, spec
        self.max_batch = max_batch
        self.drafter_factory = drafter_factory if spec.method != "greedy" else None
        budgeted = spec.budget == "auto"
        if budgeted and self.drafter_factory is not None and cost is None:
            raise ValueError("budget 'auto' needs a cost model (dresd.decoding.calibration.cached_batch_cost_model)")
        if isinstance(cost, CostModel):
            cost = BatchCostModel.from_single(cost)
        self.cost = cost if budgeted and self.drafter_factory is not None else None
        # The budget: one width per step for the whole batch (dresd.decoding.batch_plan); each
        # slot's DraftPlanner keeps its acceptance estimates and its back-off.
        self.planner = BatchPlanner(self.cost, spec.max_verify) if self.cost is not None else None
        self._drafters: list[Drafter | None] = []
        self._planners: list[DraftPlanner] = []
        self._seeds: list = []  # acceptance estimates new slots start from (inherit)
        self._cache: RowCache | None = None  # made at the first step, `max_batch` slots
        self._rows: dict[int, _Row] = {}  # slot -> the sequence decoding there
        self._waiting: deque[tuple[int, BatchRequest]] = deque()
        self._next_id = 0

    def _slot_tools(self, slot: int) -> tuple[Drafter | None, DraftPlanner]:
        while len(self._drafters) <= slot:
            self._drafters.append(self.drafter_factory() if self.drafter_factory else None)
            planner = DraftPlanner(self.cost.single() if self.cost else None, self.spec.max_verify)
            if len(self._planners) < len(self._seeds):
                planner.acceptance = self._seeds[len(self._planners)]
            self._planners.append(planner)
        return self._drafters[slot], self._planners[slot]

    def _check(self, i: int, req: BatchRequest) -> None:
        if not req.prompt_ids:
            raise ValueError(f"request {i}: prompt is empty: at least one token is needed")
        if len(req.prompt_ids) >= self.max_context:
            raise ValueError(f"request {i}: prompt has {len(req.prompt_ids)} tokens; the model's context is "
                             f"{self.max_context}")
        if req.max_new_tokens < 0:
            raise ValueError(f"request {i}: max_new_tokens must be >= 0, got {req.max_new_tokens}")

    def _join(self, cache: RowCache, joins: list[tuple[int, int, BatchRequest]]) -> list[_Row]:
        """Prefill the prompts of `joins` ((slot, request id, request) each) and write their
        entries into their slots; their rows, in order. Where one padded forward beats a
        forward per prompt (dresd.decoding.batch.PADDED_PREFILL_DEVICES), the prompts that
        join together are prefilled together, right-padded, as plain batched decoding does."""
        start = time.perf_counter()
        prefill = [i for i, (_, _, req) in enumerate(joins) if len(req.prompt_ids) > 1]
        states: dict[int, torch.Tensor] = {}
        if len(prefill) > 1 and self.model.device.type in PADDED_PREFILL_DEVICES:
            seqs = [joins[i][2].prompt_ids[:-1] for i in prefill]
            own, hidden = padded_prefill(self.model, seqs, max(self.eos_id, 0))
            for j, i in enumerate(prefill):
                n = len(seqs[j])
                for layer, layer_own in zip(cache.layers, own.layers):
                    layer.write_row(joins[i][0], layer_own.keys[j:j + 1, :, :n], layer_own.values[j:j + 1, :, :n])
                states[i] = hidden[j, :n]
        else:
            for i in prefill:
                alone = GrowingCache()
                prompt = joins[i][2].prompt_ids
                hidden, _ = forward(self.model, torch.tensor([prompt[:-1]], device=self.model.device), alone,
                                    logits=False)
                for layer, own in zip(cache.layers, alone.layers):
                    layer.write_row(joins[i][0], own.keys, own.values)
                states[i] = hidden[0]
        each_s = (time.perf_counter() - start) / max(len(joins), 1)
        rows = []
        for i, (slot, index, req) in enumerate(joins):
            prompt = list(req.prompt_ids)
            metrics = DecodeMetrics()
            metrics.prefill_s = each_s
            drafter, planner = self._slot_tools(slot)
            if drafter is not None:
                drafter.begin(prompt)
            accept = acceptor(req.sampling)
            planner.begin(accept is not None)
            fresh = [states[i]] if i in states else []
            rows.append(_Row(index, min(req.max_new_tokens, self.max_context - len(prompt)), prompt, len(prompt) - 1,
                             states[i][-1] if i in states else None, accept, metrics, start,
                             fresh_keys=fresh))
        return rows

    def _tree(self, slot: int, row: _Row, consult: bool = True) -> tuple[TokenTree, bool, float]:
        """The row's tree for this step: its drafts (every one when budgeted: the batch planner cuts
        them to the step's width; else the max_verify best supported), else the root."""
        pending, remaining = row.context[-1], row.budget - len(row.out)
        drafter, planner = self._slot_tools(slot)
        if drafter is None or remaining <= 1 or not consult or not planner.should_draft():
            return build_tree(pending, []), False, 0.0
        t0 = time.perf_counter()
        q = None if row.query is None else row.query.float().cpu().numpy()
        keys = torch.cat(row.fresh_keys).float().cpu().numpy() if row.fresh_keys else None
        row.fresh_keys.clear()
        cands = drafter.propose(DraftRequest(row.context, remaining - 1, q, keys))
        tree = build_tree(pending, cands.paths, None, cands.weights, cands.sources, cands.total)
        if self.planner is not None:
            planner.drafted(tree)  # the batch planner cuts it; this row's estimates learn from all of it
            return tree, True, time.perf_counter() - t0
        return planner.plan(tree), True, time.perf_counter() - t0

    @torch.inference_mode()
    def _verify(self, cache: RowCache, rows: dict[int, _Row], trees: dict[int, TokenTree]):
        """One forward over every slot's tree; returns (hidden, logits) shaped (B, K, ...)."""
        device, batch = self.model.device, len(cache.layers[0].keys)
        committed = {slot: row.committed for slot, row in rows.items()}
        ids, positions, mask, columns = batch_inputs(trees, committed, batch, cache.get_seq_length(),
                                                     max(self.eos_id, 0), self.model.dtype)
        cache.target(columns.to(device))
        try:
            # On a CPU the LM head runs later, on the rows acceptance reads (LazyGreedyTokens);
            # on a GPU one head over every position is one cheap kernel.
            return forward(self.model, ids.to(device), cache, positions.to(device), mask.to(device),
                           logits=device.type != "cpu")
        finally:
            cache.target(None)

    def submit(self, request: BatchRequest) -> int:
        """Queue `request`; it joins the batch at the next step with a free slot. Returns its
        id, which `step` reports when it finishes. Bad requests raise here, naming the field."""
        rid = self._next_id
        self._check(rid, request)
        self._next_id += 1
        self._waiting.append((rid, request))
        return rid

    def partial(self) -> dict[int, list[int]]:
        """Tokens emitted so far by every decoding request (id -> tokens): what a stream sends
        between steps. Waiting requests have none yet."""
        return {row.index: list(row.out) for row in self._rows.values()}

    def cancel(self, rid: int) -> Generation | None:
        """Stop request `rid` between steps (a client gone, a deadline passed, a stop string):
        it leaves the queue or frees its slot and is never reported by `step`. Returns what it
        generated so far, with its counters (empty for a waiting request); None if it is not here."""
        for i, (waiting, _) in enumerate(self._waiting):
            if waiting == rid:
                del self._waiting[i]
                return Generation(token_ids=[], metrics=DecodeMetrics())
        for slot, row in list(self._rows.items()):
            if row.index == rid:
                return self._finish(slot, self._rows.pop(slot))
        return None

    def calibration(self) -> tuple[list, list[float] | None]:
        """A copy of what this decoder learnt: its slots' acceptance estimates and the batch
        planner's measured step-cost factors (for `inherit`; holds no model or drafter)."""
        return ([copy.deepcopy(p.acceptance) for p in self._planners],
                list(self.planner.step_scale) if self.planner is not None else None)

    def inherit(self, calibration: tuple[list, list[float] | None]) -> None:
        """Start from another decoder's `calibration()`, for a decoder replacing it over the
        same model and method (a new datastore version): the estimates describe the drafter
        and the text, which a version switch changes little, and relearning them would cost
        the first requests their speed."""
        if self._drafters:
            raise RuntimeError("inherit() before the first request: this decoder has begun learning")
        self._seeds, scale = calibration
        if self.planner is not None and scale is not None:
            self.planner.adopt(scale)

    @property
    def busy(self) -> bool:
        """Whether any request is decoding or waiting."""
        return bool(self._rows or self._waiting)

    def _slots(self) -> int:
        return 0 if self._cache is None else len(self._cache.layers[0].keys)

    def _resize(self, slots: int) -> None:
        """Give the cache `slots` rows: decoding rows move to the front (in slot order), free
        rows are dropped or added. Idle rows would each cost a row of every forward."""
        if self._cache is None:
            self._cache = RowCache(self.model, slots)
            return
        old = self._slots()
        busy = sorted(self._rows)
        order = busy + [s for s in range(old) if s not in self._rows]
        keep = torch.tensor(order[: min(old, slots)], dtype=torch.long, device=self.model.device)
        for layer in self._cache.layers:
            layer.resize_rows(keep, max(0, slots - old))
        self._rows = {new: self._rows[s] for new, s in enumerate(busy)}
        # A slot's drafter and planner follow its row; the others keep their turn for new rows.
        tools = list(range(len(self._drafters)))
        moved = busy + [t for t in tools if t not in busy]
        self._drafters = [self._drafters[t] for t in moved]
        self._planners = [self._planners[t] for t in moved]

    def _fill_slots(self, done: list[tuple[int, Generation]]) -> None:
        want = min(self.max_batch, len(self._rows) + len(self._waiting))
        if want > self._slots():
            self._resize(want)
        while self._waiting:  # again when a request with nothing to generate left its slot at once
            free = [slot for slot in range(self._slots()) if slot not in self._rows]
            if not free:
                return
            joins = [(slot, *self._waiting.popleft()) for slot in free[: len(self._waiting)]]
            for (slot, rid, _), row in zip(joins, self._join(self._cache, joins)):
                if row.budget <= 0:
                    done.append((rid, self._finish(slot, row)))
                else:
                    self._rows[slot] = row

    def _alone(self, rows: dict[int, _Row]) -> bool:
        """Whether one row decodes in a one-row cache whose view ends at its entries: then the
        one-sequence verifier runs on it, with no batch mask or moves to pay for."""
        return len(rows) == 1 and self._slots() == 1 and self._cache.get_seq_length() == next(iter(rows.values())).committed

    @torch.inference_mode()
    def step(self) -> list[tuple[int, Generation]]:
        """Let waiting requests join free slots, then one draft -> plan -> verify -> accept step
        over every decoding row. Returns the (id, Generation) of the requests that finished."""
        done: list[tuple[int, Generation]] = []
        self._fill_slots(done)
        rows, cache = self._rows, self._cache
        if not rows:
            return done
        trees, drafted, spent = {}, {}, {}
        consult = self.planner is None or self.planner.should_draft()
        drafting = time.perf_counter()
        for slot, row in rows.items():
            trees[slot], drafted[slot], spent[slot] = self._tree(slot, row, consult)
            row.metrics.retrieval_s += spent[slot]
        width = 0
        if self.planner is not None and any(drafted.values()):
            trees, width = self.planner.plan(trees, {s: self._planners[s] for s in trees}, sum(spent.values()))
            # What consulting cost this step, planning included: what skipping it would save.
            self.planner.record_width(width, len(trees), time.perf_counter() - drafting)
        t0 = time.perf_counter()
        alone = self._alone(rows)
        if alone:
            (slot, row), = rows.items()
            res = verify_token_tree(self.model, cache, trees[slot], row.accept)
            outcomes = {slot: (res.path, res.new_tokens[-1], res.keys)}
        else:
            outcomes = self._verify_rows(cache, rows, trees)
        verify_s = time.perf_counter() - t0
        if width:
            self.planner.observe_step(len(rows), width, verify_s)
        share = self.planner.row_share(len(rows)) if self.planner is not None else None
        for slot, row in list(rows.items()):
            (path, bonus, keys), tree = outcomes[slot], trees[slot]
            row.committed += len(path)
            new = ([tree.tokens[n] for n in path[1:]] + [bonus])[: row.budget - len(row.out)]
            if self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
            row.metrics.record_step(len(path) - 1, len(tree) - 1, len(tree), tree.max_depth, len(new))
            row.metrics.model_s += verify_s / len(outcomes)
            if drafted[slot]:
                planner = self._planners[slot]
                if share is not None:
                    planner.cost = share  # back-off weighs drafting against this row's share of a step
                planner.record(tree, path, True, spent[slot])
            self._planners[slot].emitted(new)
            row.out.extend(new)
            row.context.extend(new)
            row.query = keys[-1]
            row.fresh_keys.append(keys)
            if len(row.out) >= row.budget or row.out[-1] == self.eos_id:
                done.append((row.index, self._finish(slot, rows.pop(slot))))
        if not alone:
            self._settle(cache, rows)
        if len(self._rows) < self._slots() and not self._waiting:
            # An idle row costs a padding row in every forward, which on a CPU costs more
            # than copying the cache once to drop it (measured in docs/benchmarks.md#batch-decode-spec).
            self._resize(len(self._rows))
        return done

    def _verify_rows(self, cache: RowCache, rows: dict[int, _Row], trees: dict[int, TokenTree]) -> dict[int, tuple]:
        """Verify every row's tree in one forward; per slot (accepted path, bonus token, the
        path's hidden states). Accepted nodes out of place move down to their row's end (`_settle`)."""
        hidden, logits = self._verify(cache, rows, trees)
        head = self.model.get_output_embeddings()
        # Greedy rows verifying their root alone read one position each: one head call over
        # those rows, not one per row (each call reads the whole head's weight).
        alone = [s for s, row in rows.items() if row.accept is None and len(trees[s]) == 1]
        first = {}
        if logits is None and len(alone) > 1:
            first = dict(zip(alone, head(hidden[alone, 0]).argmax(-1).tolist()))
        outcomes = {}
        for slot, row in rows.items():
            tree, n = trees[slot], len(trees[slot])
            if row.accept is None:
                predicted = ([first[slot]] if slot in first else logits[slot, :n].argmax(-1).tolist()
                             if logits is not None else LazyGreedyTokens(head, hidden[slot, :n], tree))
                path = greedy_accept(tree, predicted)
                bonus = int(predicted[path[-1]])
            else:
                path, bonus = row.accept(tree, logits[slot, :n] if logits is not None else head(hidden[slot, :n]))
            outcomes[slot] = (path, bonus, hidden[slot, path])
            # Node j sits at column committed + j: the path's i-th node belongs at committed + i.
            row.moves = [(row.committed + node, row.committed + i) for i, node in enumerate(path) if node != i]
        return outcomes

    @torch.inference_mode()
    def _settle(self, cache: RowCache, rows: dict[int, _Row]) -> None:
        """Move each row's accepted entries that are out of place (row.moves: cache columns,
        from and to) and view as many columns as the longest row holds."""
        move_rows, move_src, move_dst = [], [], []
        for slot, row in rows.items():
            move_rows += [slot] * len(row.moves)
            move_src += [src for src, _ in row.moves]
            move_dst += [dst for _, dst in row.moves]
            row.moves = []
        device = self.model.device
        index, src, dst = (torch.tensor(x, dtype=torch.long, device=device) for x in (move_rows, move_src, move_dst))
        width = max((r.committed for r in rows.values()), default=0)
        for layer in cache.layers:
            layer.settle(index, src, dst, width)

    def generate(self, requests: list[BatchRequest]) -> list[Generation]:
        """Decode every request; results in request order. Up to `max_batch` decode at once,
        and a waiting request takes the slot of one that finishes."""
        if self.busy:
            raise RuntimeError("generate() needs an idle decoder; use submit() and step() to join a running batch")
        for i, req in enumerate(requests):
            self._check(i, req)
        ids = {self.submit(req): i for i, req in enumerate(requests)}
        results: list[Generation | None] = [None] * len(requests)
        while self.busy:
            for rid, gen in self.step():
                results[ids[rid]] = gen
        return results  # type: ignore[return-value]

    def _finish(self, slot: int, row: _Row) -> Generation:
        drafter, _ = self._slot_tools(slot)
        if drafter is not None:
            drafter.end(row.out)
        row.metrics.wall_s = time.perf_counter() - row.started
        return Generation(token_ids=row.out, metrics=row.metrics)
