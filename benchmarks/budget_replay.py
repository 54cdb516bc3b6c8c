"""Replay logged draft trees through the draft budget: planner changes judged on the same drafts.

    .venv/bin/python benchmarks/budget_replay.py --methods dresd,suffix,hybrid-sfx --prompts 20

Timed runs of the decoding loop move by several percent with the machine's mood, which
hides most changes to the planner (dresd/decoding/budget.py). This script takes the noise out:

1. log: each method decodes the prompts with the budget off, verifying every proposed
   node (up to --max-verify), and every step's whole draft tree, the node path the target
   accepted and the drafting time are saved (runs/bench/replay/<store>-<set>-<method>.pkl;
   reused when present, --relog to redo);
2. replay: each log's steps go through the current planner in order (it learns online as
   in decoding: the tree it keeps, the part of the true path inside it, the back-off). A
   step costs the calibrated forward over the positions kept plus the logged drafting
   time; a skipped consult costs one plain step and yields one token.

The figure is tokens per unit of time relative to plain decoding (one token per one-token
forward), next to verifying everything proposed and an oracle that verifies exactly the
part of the true path that pays best. It models the loop: prefill and per-step overheads
outside the forward and the drafting are left out, and a replayed step starts where the
logged one did, whatever the previous replayed step accepted.

That last simplification misjudges changes that make the planner draft more often (the
logged replay favours them where timed runs do not: docs/speed-study.md#replaying-the-budget).
`--policy` removes it: each prompt's greedy text and the target's hidden state at every
position are recorded once (one decode without drafts, through the same loop, so the
hidden states are the ones decoding hands the drafters), then the planner walks the text
on its own: at each step the real drafter is consulted at the position the planner's
previous steps reached (after a sweep that leaves the caches as cold as a forward would),
its tree planned, the part of the kept tree the greedy text confirms accepted, and the step
charged the calibrated forward over the kept positions plus the measured drafting time.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the dresd command line sets it (dresd/cli/main.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from dresd.decoding.budget import CostModel, DraftPlanner  # noqa: E402
from dresd.decoding.calibration import cached_cost_model  # noqa: E402
from dresd.drafters import Candidates, DraftRequest  # noqa: E402
from dresd.decoding.tree import TokenTree, UnsettledTrees, accepted_in, offered_nodes, subtree  # noqa: E402
from dresd.evaluation.methods import SUFFIX_AS_PUBLISHED  # noqa: E402
from dresd.evaluation.replay import walk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = {  # method name -> SpeculativeConfig fields (logging adds budget off; --policy keeps the budget)
    "dresd": dict(method="dresd"),
    "dresd-store": dict(method="dresd", context_keys=False),
    "hybrid": dict(method="hybrid"),
    "hybrid-sfx": dict(method="hybrid", hybrid_exact="suffix", **SUFFIX_AS_PUBLISHED),
    "suffix": dict(method="suffix", **SUFFIX_AS_PUBLISHED),
    "suffix-own": dict(method="suffix"),  # the defaults: no response crosses requests (without a store: the request's own text)
    "pld": dict(method="pld"),
    "rest": dict(method="rest"),
    "auto": dict(method="auto"),  # the default: with a datastore, the dense drafts and SuffixDecoding in one tree
}


def method_list(text: str) -> list[str]:
    """--methods: comma-separated, or ';'-separated where entries carry overrides with commas."""
    return [m.strip() for m in text.split(";" if ";" in text else ",") if m.strip()]


def method_spec(name: str):
    """A --methods entry -> its SpeculativeConfig: a SPECS name, optionally with `--set`-style
    overrides after a colon ("auto:num_drafts=20,len_drafts=16"), walked as another method."""
    from dresd.config import SpeculativeConfig
    from dresd.config.loader import ConfigError, apply_overrides

    base, _, overrides = name.partition(":")
    if base not in SPECS:
        raise SystemExit(f"--methods: {base!r} is not one of {', '.join(SPECS)}")
    try:
        return apply_overrides(SpeculativeConfig(**SPECS[base]), filter(None, overrides.split(",")))
    except ConfigError as exc:
        raise SystemExit(f"--methods {name!r}: {exc}") from None


class TreeLog:
    """Stands in for a decoder's planner: delegates to it and keeps every drafted step, and
    scores the planner's estimates over each whole drafted tree against the emitted text:
    `calibration` holds (depth, predicted P(accepted | parent accepted), accepted) for every
    node whose parent the text accepted, predicted before the tree's outcome was known."""

    def __init__(self, inner: DraftPlanner):
        self.inner = inner
        self.steps: list[dict] = []
        self.calibration: list[tuple[int, float, bool]] = []
        self._unsettled = UnsettledTrees()  # tagged with the planner's node probabilities at plan()
        self.learning_s = 0.0  # the planner's own time in emitted(): a decoding step pays it too

    def should_draft(self) -> bool:
        return self.inner.should_draft()

    def begin(self, sampled: bool) -> None:
        self._unsettled.drain()  # a text that ended inside a tree leaves it unscored
        self.inner.begin(sampled)

    def plan(self, tree: TokenTree) -> TokenTree:
        if len(tree) > 1:
            self._unsettled.add(tree, self.inner.acceptance.node_probs(tree, self.inner.sampled))
        return self.inner.plan(tree)

    def drafted(self, tree: TokenTree) -> None:
        self.inner.drafted(tree)

    def emitted(self, tokens: list[int]) -> None:
        for tree, probs, path in self._unsettled.emitted(tokens):
            for i, accepted in offered_nodes(tree, path):
                parent = probs[tree.parents[i]]
                self.calibration.append((tree.depths[i], probs[i] / parent if parent else 0.0, accepted))
        start = time.perf_counter()
        self.inner.emitted(tokens)
        self.learning_s += time.perf_counter() - start

    def observe_step(self, positions: int, seconds: float) -> None:
        self.inner.observe_step(positions, seconds)

    def record(self, tree: TokenTree, path: list[int], drafted: bool, retrieval_s: float) -> None:
        if drafted:
            self.steps.append(dict(tokens=tree.tokens, parents=tree.parents, weight=tree.weight,
                                   source=tree.source, path=path, retrieval_s=retrieval_s))
        self.inner.record(tree, path, drafted, retrieval_s)


def log_method(engine, method: str, prompts: list[str], max_new_tokens: int, max_verify: int) -> list[dict]:
    """Decode `prompts` with `method`, budget off, and return every drafted step."""
    from dataclasses import replace

    spec = replace(method_spec(method), budget="off", max_verify=max_verify)
    decoder = engine.decoder(spec)
    log = TreeLog(decoder.planner)
    decoder.planner = log
    for prompt in prompts:
        engine.generate(prompt, spec, max_new_tokens)
    return log.steps


def to_tree(step: dict) -> TokenTree:
    """A logged step's tree, rebuilt."""
    tree = TokenTree([step["tokens"][0]], [-1], [0], [{}], [step["weight"][0]], [step["source"][0]])
    for i in range(1, len(step["tokens"])):
        node = tree.add_child(step["parents"][i], step["tokens"][i], step["source"][i])
        tree.weight[node] = step["weight"][i]
    return tree


def sources_of(steps: list[dict]) -> list[str]:
    """The single drafters a log's trees hold ("dense+suffix" counts for both)."""
    return sorted({part for step in steps for src in step["source"][1:] for part in src.split("+") if part})


def only_source(tree: TokenTree, source: str) -> TokenTree:
    """The part of `tree` that `source` proposed (a node and all its ancestors proposed by it)."""
    keep, inside = [], {0}
    for i in range(1, len(tree)):
        if tree.parents[i] in inside and source in tree.source[i].split("+"):
            inside.add(i)
            keep.append(i)
    return subtree(tree, keep)


def replay(steps: list[dict], cost: CostModel, mode: str = "budget") -> float:
    """Tokens per unit time relative to plain decoding: the planner ("budget"; "flat" with a
    constant prior in every acceptance cell; "source:<name>" on that drafter's part of each
    tree alone), "all" nodes, or the "oracle"."""
    planner = DraftPlanner(cost)
    planner.acceptance.shrink = mode != "flat"
    tokens = seconds = 0.0
    plain = cost.cost(1)
    for step in steps:
        tree = to_tree(step)
        true_tokens = [tree.tokens[n] for n in step["path"][1:]]
        if mode.startswith("source:"):
            tree = only_source(tree, mode.split(":", 1)[1])
        if mode == "oracle":
            m = max(range(len(true_tokens) + 1), key=lambda j: (j + 1) / cost.cost(j + 1))
            tokens, seconds = tokens + m + 1, seconds + cost.cost(m + 1) + step["retrieval_s"]
        elif mode == "all":
            tokens, seconds = tokens + len(true_tokens) + 1, seconds + cost.cost(len(tree)) + step["retrieval_s"]
        elif not planner.should_draft():
            tokens, seconds = tokens + 1, seconds + plain
        else:
            kept = planner.plan(tree) if len(tree) > 1 else tree
            path = accepted_in(kept, true_tokens)
            tokens, seconds = tokens + len(path), seconds + cost.cost(len(kept)) + step["retrieval_s"]
            planner.record(kept, path, True, step["retrieval_s"])
            # The logged path is where the text left the whole logged tree (-1: no token is).
            planner.emitted(true_tokens + [-1])
    return tokens / seconds * plain if seconds else 0.0


class _Recorder:
    """A drafter that drafts nothing and keeps the hidden states the loop hands over."""

    name = "recorder"

    def __init__(self):
        self.keys: list = []

    def begin(self, prompt_ids: list[int]) -> None:
        self.keys = []

    def end(self, generated: list[int]) -> None:
        pass

    def propose(self, request: DraftRequest) -> Candidates:
        if request.new_keys is not None:
            self.keys.append(request.new_keys.copy())
        return Candidates()


def record_texts(engine, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Per prompt: the greedy text (prompt + output ids) and the hidden states decoding
    hands its drafters (row i, at position i, produced token i + 1), up to the last position
    a consult can query."""
    import numpy as np

    from dresd.config import SpeculativeConfig
    from dresd.decoding.loop import SpeculativeDecoder

    lm, recorder = engine.lm, _Recorder()
    decoder = SpeculativeDecoder(lm.model, lm.eos_token_id, lm.max_context,
                                 SpeculativeConfig(method="dresd", budget="off"), recorder)
    texts = []
    for prompt in prompts:
        ids = engine.prompt_ids(prompt)
        gen = decoder.generate_ids(ids, max_new_tokens)
        out = gen.token_ids
        hidden = np.concatenate(recorder.keys)
        # A consult needs the hidden states up to the one before its position, and the loop
        # consults while two or more tokens remain: positions up to len - 4 at least.
        if len(hidden) < len(ids) + len(out) - 3:
            raise RuntimeError(f"recorded {len(hidden)} hidden states for {len(ids)} + {len(out)} tokens")
        # Every step was a plain one-token step: what a plain step costs in decoding here.
        plain = gen.metrics.model_s / max(gen.metrics.target_calls, 1)
        texts.append(dict(prompt_len=len(ids), tokens=ids + out, hidden=hidden, plain_s=plain))
    return texts


# Swept before each consult (past the L3); trades walk time against cold caches; docs/speed-study.md#on-policy-replay.
EVICT_BYTES = 64 * 2**20


def policy_rate(engine, method: str, texts: list[dict], cost: CostModel, rescale: bool = True,
                acceptance: dict | None = None, detail: dict | None = None, oracle: bool = False,
                verified_only: bool = False) -> float:
    """Tokens per unit time relative to plain decoding when the planner walks the texts itself.

    The calibration's one-token forward runs over a fixed 256-token context and costs more
    than decoding's plain steps, while its trees match decoding's within a few percent
    (docs/speed-study.md#budget-constants); decoding's planner corrects this as it measures
    its own steps (DraftPlanner.observe_step). The walk starts from that correction: plain steps cost what
    the recorded ones did, trees what the calibration says. `rescale=False` takes `cost` as it
    is (a curve measured on another machine, whose plain steps this one's do not match).
    `acceptance` overrides fields of the planner's AcceptanceModel (planner variants).
    `detail`, when given, is filled with where the walk's time went (walk_detail).
    `oracle` walks the bound instead of the planner (dresd.evaluation.replay.walk);
    `verified_only` plans with estimates learnt from verified nodes alone (no hindsight).
    """
    from statistics import median

    import numpy as np

    from dresd.drafters.registry import make_drafter

    plain = median(t["plain_s"] for t in texts) if rescale else cost.cost(1)
    cost = cost.scaled(plain / cost.cost(1), 1.0)
    spec = method_spec(method)
    drafter = make_drafter(spec, engine.datastore, engine.lm.tokenizer, engine.lm.eos_token_id)
    planner = DraftPlanner(cost, spec.max_verify, hindsight=not verified_only)
    for name, value in (acceptance or {}).items():
        setattr(planner.acceptance, name, value)
    log = TreeLog(planner)
    evict = np.ones(EVICT_BYTES // 8)
    tokens = seconds = 0.0
    for text in texts:
        n, s = walk(drafter, log, cost, text, evict, oracle)
        tokens, seconds = tokens + n, seconds + s
    seconds += log.learning_s
    if detail is not None:
        detail.update(walk_detail(log.steps, tokens, seconds), calibration=calibration_summary(log.calibration),
                      learning_ms_per_consult=1000 * log.learning_s / max(len(log.steps), 1))
    return tokens / seconds * plain


def calibration_summary(rows: list[tuple[int, float, bool]]) -> dict:
    """Mean log-loss per node of the predicted conditionals, and per depth group (nodes,
    mean predicted, observed)."""
    import math

    from dresd.evaluation.reliability import DEPTH_GROUPS, depth_group_label

    eps = 1e-4
    clipped = [(min(max(p, eps), 1 - eps), a) for _, p, a in rows]
    loss = [-math.log(q if a else 1 - q) for q, a in clipped]
    groups = {}
    for lo, hi in DEPTH_GROUPS:
        sel = [(p, a) for d, p, a in rows if lo <= d <= hi]
        if sel:
            groups[depth_group_label(lo, hi)] = (len(sel), sum(p for p, _ in sel) / len(sel),
                                                 sum(a for _, a in sel) / len(sel))
    return dict(nodes=len(rows), log_loss=sum(loss) / len(loss) if loss else 0.0, depths=groups, rows=rows)


def walk_detail(steps: list[dict], tokens: float, seconds: float) -> dict:
    """Where a walk's time went: its consults, the plain steps between them (back-off), tokens
    and verified positions per consult, drafting's share, and per source (nodes labelled
    by every drafter that proposed them) the verified nodes and the share accepted."""
    from collections import Counter

    verified, accepted = Counter(), Counter()
    for step in steps:
        on_path = set(step["path"])
        for i in range(1, len(step["tokens"])):
            verified[step["source"][i]] += 1
            accepted[step["source"][i]] += i in on_path
    consults = max(len(steps), 1)
    drafting = sum(step["retrieval_s"] for step in steps)
    drafted_tokens = sum(len(step["path"]) for step in steps)
    return dict(consults=len(steps), plain_steps=int(tokens - drafted_tokens),
                tokens_per_consult=drafted_tokens / consults,
                positions_per_consult=sum(len(step["tokens"]) - 1 for step in steps) / consults,
                drafting_ms_per_consult=1000 * drafting / consults, drafting_share=drafting / seconds if seconds else 0.0,
                sources={src: (n, accepted[src] / n) for src, n in verified.most_common()})


def parse_variant(text: str) -> tuple[str, dict]:
    """'current', 'oracle', 'verified-only' or 'field=value,...' (AcceptanceModel fields;
    numbers, 0/1 for flags) -> (label, fields)."""
    from dresd.decoding.budget import AcceptanceModel

    text = text.strip()
    if text in ("", "current", "oracle", "verified-only"):
        return text or "current", {}
    fields = {}
    known = AcceptanceModel.__dataclass_fields__
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        if name not in known or not value:
            raise SystemExit(f"--variants: {pair!r} is not field=value with an AcceptanceModel field ({', '.join(known)})")
        kind = type(getattr(AcceptanceModel(), name))
        fields[name] = bool(int(value)) if kind is bool else kind(value)
    return text, fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="dresd,suffix,hybrid-sfx", help=f"comma list of {', '.join(SPECS)}, each "
                   "optionally with SpeculativeConfig overrides after a colon (auto:num_drafts=20,len_drafts=16; "
                   "separate such entries with ';' instead of ',')")
    p.add_argument("--store", default="id", help="benchmark store name (runs/bench/stores/<name>) or a datastore path")
    p.add_argument("--set", default="mtbench", choices=["mtbench", "sharegpt"])
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-verify", type=int, default=32, help="nodes verified per logged step (the best-supported)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--relog", action="store_true", help="decode again even where a log exists")
    p.add_argument("--cost-file", default=None,
                   help="a cached cost model (<cache>/cost/<hash>.json) to plan with instead of this machine's "
                        "calibration: replays then compare planners on a curve measured when the machine was quiet")
    p.add_argument("--policy", action="store_true",
                   help="walk the recorded greedy texts with the planner instead of replaying logged steps")
    p.add_argument("--plot", default=None,
                   help="with --policy: write reliability diagrams of the whole-tree calibration to this PNG "
                        "(one panel per method and variant, lines per depth)")
    p.add_argument("--no-store", action="store_true",
                   help="with --policy: the drafters draft without a datastore (pld, suffix, suffix-own, auto); "
                        "--store still names the recorded texts (and records them when missing)")
    p.add_argument("--variants", default="current",
                   help="with --policy: planner variants to walk, ';'-separated, each 'current', 'oracle' (the "
                        "bound: exactly the confirmed nodes of the whole tree, consults that find none skipped), "
                        "'verified-only' (estimates learnt from verified nodes alone, without hindsight) or "
                        "AcceptanceModel field=value pairs joined by ',' (e.g. 'current;oracle;prior_rate=0.5,decay=0.999')")
    args = p.parse_args(argv)

    from benchmarks.spec_bench import eval_sets
    from dresd.config import ModelConfig
    from dresd.datastore.store import Datastore
    from dresd.decoding.engine import Engine
    from dresd.model.loading import load_model

    store = Path(args.store) if os.sep in args.store else Path(args.workdir) / "stores" / args.store
    lm = load_model(ModelConfig())
    if args.cost_file:
        import json

        cost = CostModel(**json.loads(Path(args.cost_file).read_text())["value"])
    else:
        cost = cached_cost_model(lm.model)
    engine = None
    prompts = eval_sets([args.set])[args.set][: args.prompts]
    rel = ", ".join(f"k={k}: {v:.2f}x" for k, v in cost.relative().items() if k <= 16)
    print(f"cost model: {rel}\n")
    if args.policy:
        path = Path(args.workdir) / "replay" / f"{store.name}-{args.set}-texts-{args.prompts}x{args.max_new_tokens}.pkl"
        engine = Engine(lm, Datastore(store), cost=cost)
        if args.relog or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(record_texts(engine, prompts, args.max_new_tokens)))
            tmp.replace(path)
        texts = pickle.loads(path.read_bytes())
        if args.no_store:
            engine = Engine(lm, None, engine.prompt_format, cost=cost)
        variants = [parse_variant(v) for v in args.variants.split(";")]
        print("| method | " + " | ".join(name for name, _ in variants) + " |")
        print("|---|" + "---|" * len(variants))
        details = {}
        for method in method_list(args.methods):
            details[method] = {}
            rates = []
            for label, fields in variants:
                details[method][label] = {}
                rates.append(policy_rate(engine, method, texts, cost, rescale=not args.cost_file, acceptance=fields,
                                         detail=details[method][label], oracle=label == "oracle",
                                         verified_only=label == "verified-only"))
            print(f"| {method} | " + " | ".join(f"{r:.3f}x" for r in rates) + " |", flush=True)
        print("\nCalibration over whole drafted trees (nodes whose parent the text accepted; predicted "
              "P(accepted | parent accepted) before the outcome, against observed; per depth: nodes, predicted, "
              "observed):\n")
        from dresd.evaluation.reliability import DEPTH_GROUPS, ReliabilityLog, depth_group_label, plot_reliability

        labels = [depth_group_label(lo, hi) for lo, hi in DEPTH_GROUPS]
        print("| method | variant | nodes | log-loss / node | " + " | ".join(f"depth {x}" for x in labels) + " |")
        print("|---|---|---|---|" + "---|" * len(DEPTH_GROUPS))
        diagrams = ReliabilityLog()
        for method, by_variant in details.items():
            for label, d in by_variant.items():
                if label == "oracle":
                    continue
                c = d["calibration"]
                for depth, predicted, accepted in c["rows"]:
                    diagrams.add(f"{method}, {label}", depth, predicted, accepted)
                cells = ["{} / {:.3f} / {:.3f}".format(*c["depths"][x]) if x in c["depths"] else "-" for x in labels]
                print(f"| {method} | {label} | {c['nodes']} | {c['log_loss']:.3f} | " + " | ".join(cells) + " |")
        if args.plot and plot_reliability(diagrams, Path(args.plot), max_sources=len(diagrams.cells),
                                          nodes="nodes after an accepted parent",
                                          predicted="predicted P(accepted | parent accepted)"):
            print(f"\nreliability diagrams: {args.plot}")
        details = {method: by_variant[variants[0][0]] for method, by_variant in details.items()}
        print(f"\nWhere the walks' time went ({variants[0][0]}; sources: verified nodes, share accepted):\n")
        print("| method | consults | plain steps | tokens / consult | positions / consult | drafting ms / consult "
              "| learning ms / consult | drafting share | by source |")
        print("|---|---|---|---|---|---|---|---|---|")
        for method, d in details.items():
            by_source = ", ".join(f"{src} {n} ({rate:.2f})" for src, (n, rate) in d["sources"].items())
            print(f"| {method} | {d['consults']} | {d['plain_steps']} | {d['tokens_per_consult']:.2f} | "
                  f"{d['positions_per_consult']:.2f} | {d['drafting_ms_per_consult']:.2f} | "
                  f"{d['learning_ms_per_consult']:.2f} | "
                  f"{100 * d['drafting_share']:.1f}% | {by_source} |")
        return 0
    print("| method | logged steps | budget (replayed) | flat prior | verify all proposed | oracle | "
          "each source alone (budget) |")
    print("|---|---|---|---|---|---|---|")
    for method in method_list(args.methods):
        path = Path(args.workdir) / "replay" / f"{store.name}-{args.set}-{method}-{args.prompts}x{args.max_new_tokens}.pkl"
        if args.relog or not path.exists():
            engine = engine or Engine(lm, Datastore(store), cost=cost)
            steps = log_method(engine, method, prompts, args.max_new_tokens, args.max_verify)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(steps))
            tmp.replace(path)
        steps = pickle.loads(path.read_bytes())
        figures = [replay(steps, cost, mode) for mode in ("budget", "flat", "all", "oracle")]
        alone = ", ".join(f"{src} {replay(steps, cost, 'source:' + src):.3f}x" for src in sources_of(steps))
        print(f"| {method} | {len(steps)} | " + " | ".join(f"{x:.3f}x" for x in figures) + f" | {alone} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
