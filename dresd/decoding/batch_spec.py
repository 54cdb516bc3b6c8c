"""Batched speculative decoding: many sequences per forward, each with its own draft tree.

Every row of the batch carries a token tree rooted at its pending token (just the root when
it has no drafts); one forward verifies all of them, with per-row positions and a 4-D mask
that lets each node see its own row's committed entries and its tree ancestors only. Each
row then accepts its own path (greedy, or speculative sampling with its own generator),
exactly as `dresd.decoding.loop.SpeculativeDecoder` does for one sequence.

The shared KV cache is laid out so that column j of a row holds that row's position j: a
row's committed entries fill columns [0, committed) and anything after them in the view is
masked. A step appends the trees' entries after the widest row, then moves each row's
accepted path down to its own end (only the accepted entries are copied), so rows advance
by different amounts without padding that grows or a compaction pass. A row that finishes
frees its slot between steps, and a waiting request joins there: its prompt is prefilled
on its own (no padded position is computed) and written into the slot.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from dresd.config import SpeculativeConfig
from dresd.decoding.acceptance import acceptor
from dresd.decoding.budget import CostModel, DraftPlanner
from dresd.decoding.kv_cache import GrowingCache, GrowingLayer
from dresd.decoding.loop import Generation
from dresd.decoding.metrics import DecodeMetrics
from dresd.decoding.tree import TokenTree, ancestor_matrix, build_tree, greedy_accept
from dresd.decoding.verify import LazyGreedyTokens, forward
from dresd.drafters import Drafter, DraftRequest

if TYPE_CHECKING:
    from dresd.config import SamplingParams


class RowLayer(GrowingLayer):
    """A growing layer whose rows hold sequences of different lengths (see the module docstring)."""

    _zero_room = True

    @torch.inference_mode()
    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one sequence's (1, H, n, D) entries at columns [0, n) of `row`."""
        n = keys.shape[-2]
        width = max(self.get_seq_length(), n)
        self._room_for(width, self.keys, self.values)
        self._key_buf[row, :, :n].copy_(keys[0])
        self._value_buf[row, :, :n].copy_(values[0])
        self._view(width)

    @torch.inference_mode()
    def settle(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, width: int) -> None:
        """Move entry (rows[i], src[i]) to (rows[i], dst[i]); then view `width` columns."""
        self._room_for(self.get_seq_length(), self.keys, self.values)
        moved_k = self._key_buf[rows, :, src]  # advanced indexing copies: safe to write back
        moved_v = self._value_buf[rows, :, src]
        self._key_buf[rows, :, dst] = moved_k
        self._value_buf[rows, :, dst] = moved_v
        self._view(width)


    @torch.inference_mode()
    def resize_rows(self, keep: torch.Tensor, extra: int = 0) -> None:
        """Keep rows `keep` (in that order), then add `extra` empty rows; the view keeps its width."""
        width = self.get_seq_length()
        self._room_for(width, self.keys, self.values)
        k, v = self._key_buf[keep], self._value_buf[keep]  # advanced indexing copies
        if extra:
            k = torch.cat([k, k.new_zeros(extra, *k.shape[1:])])
            v = torch.cat([v, v.new_zeros(extra, *v.shape[1:])])
        self._key_buf, self._value_buf = k, v
        self._view(width)


class RowCache(GrowingCache):
    """The batch's KV cache: one RowLayer per decoder layer, `slots` rows."""

    def __init__(self, model, slots: int):
        super().__init__()
        self.layer_class_to_replicate = RowLayer
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        empty = torch.zeros(slots, heads, 0, head_dim, dtype=model.dtype, device=model.device)
        for index in range(config.num_hidden_layers):
            self.update(empty, empty, index)


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
                 drafter_factory: Callable[[], Drafter | None] | None = None, cost: CostModel | None = None,
                 max_batch: int = 16):
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
            raise ValueError("budget 'auto' needs a cost model (dresd.decoding.calibration.cached_cost_model)")
        self.cost = cost if budgeted else None
        self._drafters: list[Drafter | None] = []
        self._planners: list[DraftPlanner] = []
        self._cache: RowCache | None = None  # made at the first step, `max_batch` slots
        self._rows: dict[int, _Row] = {}  # slot -> the sequence decoding there
        self._waiting: deque[tuple[int, BatchRequest]] = deque()
        self._next_id = 0

    def _slot_tools(self, slot: int) -> tuple[Drafter | None, DraftPlanner]:
        while len(self._drafters) <= slot:
            self._drafters.append(self.drafter_factory() if self.drafter_factory else None)
            self._planners.append(DraftPlanner(self.cost, self.spec.max_verify))
        return self._drafters[slot], self._planners[slot]

    def _check(self, i: int, req: BatchRequest) -> None:
        if not req.prompt_ids:
            raise ValueError(f"request {i}: prompt is empty: at least one token is needed")
        if len(req.prompt_ids) >= self.max_context:
            raise ValueError(f"request {i}: prompt has {len(req.prompt_ids)} tokens; the model's context is "
                             f"{self.max_context}")
        if req.max_new_tokens < 0:
            raise ValueError(f"request {i}: max_new_tokens must be >= 0, got {req.max_new_tokens}")

    def _join(self, cache: RowCache, slot: int, index: int, req: BatchRequest) -> _Row:
        """Prefill `req` alone and write its entries into `slot`."""
        start = time.perf_counter()
        prompt, query = list(req.prompt_ids), None
        fresh: list[torch.Tensor] = []
        if len(prompt) > 1:
            alone = GrowingCache()
            hidden, _ = forward(self.model, torch.tensor([prompt[:-1]], device=self.model.device), alone, logits=False)
            query, fresh = hidden[0, -1], [hidden[0]]
            for layer, own in zip(cache.layers, alone.layers):
                layer.write_row(slot, own.keys, own.values)
        accept = acceptor(req.sampling)
        metrics = DecodeMetrics()
        metrics.prefill_s = time.perf_counter() - start
        drafter, _ = self._slot_tools(slot)
        if drafter is not None:
            drafter.begin(prompt)
        return _Row(index, min(req.max_new_tokens, self.max_context - len(prompt)), prompt, len(prompt) - 1,
                    query, accept, metrics, start, fresh_keys=fresh)

    def _tree(self, slot: int, row: _Row) -> tuple[TokenTree, bool, float]:
        """The row's tree for this step: its drafts as the planner keeps them, else the root."""
        pending, remaining = row.context[-1], row.budget - len(row.out)
        drafter, planner = self._slot_tools(slot)
        if drafter is None or remaining <= 1 or not planner.should_draft():
            return build_tree(pending, []), False, 0.0
        t0 = time.perf_counter()
        q = None if row.query is None else row.query.float().cpu().numpy()
        keys = torch.cat(row.fresh_keys).float().cpu().numpy() if row.fresh_keys else None
        row.fresh_keys.clear()
        cands = drafter.propose(DraftRequest(row.context, remaining - 1, q, keys))
        tree = planner.plan(build_tree(pending, cands.paths, None, cands.weights, cands.sources, cands.total))
        return tree, True, time.perf_counter() - t0

    @torch.inference_mode()
    def _verify(self, cache: RowCache, rows: dict[int, _Row], trees: dict[int, TokenTree]):
        """One forward over every slot's tree; returns (hidden, logits) shaped (B, K, ...)."""
        device, batch = self.model.device, len(cache.layers[0].keys)
        width = cache.get_seq_length()
        k = max(len(t) for t in trees.values())
        ids = torch.full((batch, k), max(self.eos_id, 0), dtype=torch.long)  # padding: any valid id, masked
        positions = torch.zeros((batch, k), dtype=torch.long)
        allowed = torch.zeros((batch, 1, k, width + k), dtype=torch.bool)
        allowed[:, 0, torch.arange(k), width + torch.arange(k)] = True  # padding nodes see themselves
        for slot in range(batch):
            tree = trees.get(slot)
            if tree is None:  # an idle slot: one padding node
                continue
            n, c = len(tree), rows[slot].committed
            ids[slot, :n] = torch.tensor(tree.tokens)
            positions[slot, :n] = torch.tensor(tree.depths) + c
            positions[slot, n:] = c
            allowed[slot, 0, :n, :c] = True
            allowed[slot, 0, :n, width:width + n] = ancestor_matrix(tree)
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
        # On a CPU the LM head runs later, on the rows acceptance reads (LazyGreedyTokens); on a
        # GPU one head over every position is one cheap kernel.
        return forward(self.model, ids.to(device), cache, positions.to(device), mask.to(device),
                       logits=device.type != "cpu")

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

    def cancel(self, rid: int) -> bool:
        """Stop request `rid` between steps (a client gone, a deadline passed): it leaves the
        queue or frees its slot and is never reported by `step`. False if it is not here."""
        for i, (waiting, _) in enumerate(self._waiting):
            if waiting == rid:
                del self._waiting[i]
                return True
        for slot, row in list(self._rows.items()):
            if row.index == rid:
                self._finish(slot, self._rows.pop(slot))
                return True
        return False

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
        for slot in range(self._slots()):
            while slot not in self._rows and self._waiting:
                rid, req = self._waiting.popleft()
                row = self._join(self._cache, slot, rid, req)
                if row.budget <= 0:
                    done.append((rid, self._finish(slot, row)))
                else:
                    self._rows[slot] = row

    @torch.inference_mode()
    def step(self) -> list[tuple[int, Generation]]:
        """Let waiting requests join free slots, then one draft -> verify -> accept step over
        every decoding row. Returns the (id, Generation) of the requests that finished."""
        done: list[tuple[int, Generation]] = []
        self._fill_slots(done)
        rows, cache = self._rows, self._cache
        if not rows:
            return done
        trees, drafted, spent = {}, {}, {}
        for slot, row in rows.items():
            trees[slot], drafted[slot], spent[slot] = self._tree(slot, row)
            row.metrics.retrieval_s += spent[slot]
        t0 = time.perf_counter()
        width = cache.get_seq_length()
        hidden, logits = self._verify(cache, rows, trees)
        head = self.model.get_output_embeddings()
        move_rows, move_src, move_dst = [], [], []
        for slot, row in list(rows.items()):
            tree, n = trees[slot], len(trees[slot])
            if row.accept is None:
                predicted = (logits[slot, :n].argmax(-1).tolist() if logits is not None
                             else LazyGreedyTokens(head, hidden[slot, :n], tree))
                path = greedy_accept(tree, predicted)
                bonus = int(predicted[path[-1]])
            else:
                path, bonus = row.accept(tree, logits[slot, :n] if logits is not None else head(hidden[slot, :n]))
            move_rows += [slot] * len(path)
            move_src += [width + n for n in path]
            move_dst += list(range(row.committed, row.committed + len(path)))
            row.committed += len(path)
            new = ([tree.tokens[n] for n in path[1:]] + [bonus])[: row.budget - len(row.out)]
            if self.eos_id in new:
                new = new[: new.index(self.eos_id) + 1]
            row.metrics.record_step(len(path) - 1, len(tree) - 1, len(tree), tree.max_depth, len(new))
            if drafted[slot]:
                self._slot_tools(slot)[1].record(tree, path, True, spent[slot])
            row.out.extend(new)
            row.context.extend(new)
            row.query = hidden[slot, path[-1]]
            row.fresh_keys.append(hidden[slot, path])
            if len(row.out) >= row.budget or row.out[-1] == self.eos_id:
                done.append((row.index, self._finish(slot, rows.pop(slot))))
        new_width = max((r.committed for r in rows.values()), default=0)
        index = torch.tensor(move_rows, device=self.model.device)
        src = torch.tensor(move_src, device=self.model.device)
        dst = torch.tensor(move_dst, device=self.model.device)
        for layer in cache.layers:
            layer.settle(index, src, dst, new_width)
        step_s = time.perf_counter() - t0
        for row in rows.values():
            row.metrics.model_s += step_s / max(1, len(rows))
        if len(self._rows) < self._slots() and not self._waiting:
            self._resize(len(self._rows))
        return done

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
