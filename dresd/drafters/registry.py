"""One place that turns a SpeculativeConfig's method into a drafter: the method registry.

The built-in methods are registered here; `register_method` (or the "dresd.drafters"
entry-point group of an installed package) adds others, which then work everywhere a
method name does: configs, `dresd generate --method`, the serving pool, the side-by-side
benchmark (`benchmarks/spec_bench.py --methods`). Retrieval baselines are built from the
very corpus token streams of the dense datastore (its tokens.npy and record offsets), so
every method drafts from the same text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from dresd.config import SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.drafters import Drafter, sibling_of
from dresd.datastore.formatting import response_header, shared_prefix_len, split_record
from dresd.storage.cache import cache_root, inside_cache
from dresd.storage.eviction import use_entry
from dresd.storage.names import name_problem

# ----------------------------------------------------------------------------- the registry

# Installed packages add methods through this entry-point group, so every process (each Ray
# actor included) finds them without the driver's help:
#   [project.entry-points."dresd.drafters"]
#   my-method = "my_package.drafting:build"      # a builder, or a MethodEntry
ENTRY_POINT_GROUP = "dresd.drafters"

# (spec, datastore or None, tokenizer, eos id) -> a Drafter (None = plain decoding).
DrafterBuilder = Callable[[SpeculativeConfig, "Datastore | None", Any, int], "Drafter | None"]


@dataclass(frozen=True)
class MethodEntry:
    """A decoding method: how to build its drafter, and whether it drafts from a datastore."""

    build: DrafterBuilder
    needs_datastore: bool = False


_METHODS: dict[str, MethodEntry] = {}
_plugins_loaded = False


def register_method(name: str, build: DrafterBuilder | MethodEntry, needs_datastore: bool = False,
                    replace: bool = False) -> None:
    """Make `name` a decoding method (`SpeculativeConfig.method`, `--method`, the serving pool).

    Registered in one process only: for Ray actors use the entry-point group (or register in a
    module the actors import)."""
    if not name or "," in name:
        raise ValueError(f"method name {name!r}: must be non-empty and hold no comma")
    if name in _METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered (replace=True to override it)")
    _METHODS[name] = build if isinstance(build, MethodEntry) else MethodEntry(build, needs_datastore)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _METHODS:
            continue  # a built-in or an explicit registration wins over a plugin of the same name
        try:
            target = ep.load()
            if not (isinstance(target, MethodEntry) or callable(target)):
                raise TypeError(f"{type(target).__name__} is neither a builder nor a MethodEntry")
        except Exception as exc:  # a broken plugin must not take the built-in methods down
            warnings.warn(f"drafter plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}", stacklevel=2)
            continue
        register_method(ep.name, target)


def available_methods() -> list[str]:
    """Every decoding method: the built-ins, then registered ones and installed plugins."""
    _load_plugins()
    return list(_METHODS)


def method_entry(name: str) -> MethodEntry:
    """The registry entry of method `name`; ValueError naming the known ones if none."""
    if name not in _METHODS:
        _load_plugins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(available_methods())}")
    return _METHODS[name]


def derived_dir(store: Datastore) -> Path:
    """Cache folder for artifacts derived from one datastore version (keyed by its token stream
    and its tombstones: the indexes hold live records only, so a delete needs fresh ones).
    Its name comes from the store's manifest, which is untrusted: it must stay one plain name."""
    files = store.manifest.get("files", {})
    digest = files.get("tokens.npy", {}).get("sha256") or store.version
    name = f"{store.version}-{str(digest)[:12]}"
    deleted = getattr(store, "deleted", None)
    if deleted is not None and deleted.any():
        name += f"-{str(files.get('deleted.npy', {}).get('sha256') or 'deleted')[:12]}"
    if problem := name_problem(name):
        raise ValueError(f"datastore {store.path}: derived cache folder name {name!r}, which {problem}")
    folder = inside_cache(cache_root() / "derived" / name, f"datastore {store.path}")
    # Leased for as long as the store is open (its `leases`), so the bounded node cache
    # (dresd.storage.eviction) does not evict it while drafters are built from it.
    leases = getattr(store, "leases", None)
    if isinstance(leases, dict) and str(folder) in leases:
        return folder
    lease = use_entry(folder)
    if isinstance(leases, dict):
        leases[str(folder)] = lease
    else:  # a store-like object without leases: only its use is recorded
        lease.release()
    return folder


def store_pairs(store: Datastore, tokenizer):
    """(prompt ids, response ids) of every live datastore record (deleted ones left out),
    split after the response header."""
    fmt = store.manifest["prompt_format"]["name"]
    header, head = response_header(tokenizer, fmt), shared_prefix_len(tokenizer, fmt)
    for record in store.live_records():
        prompt, response = split_record(record, header, head)
        if response and response[-1] == store.eos_id:
            response = response[:-1]
        yield prompt, response


def _suffix_drafter(spec: SpeculativeConfig, store: Datastore | None, tokenizer, eos_id: int):
    """SuffixDecoding with its global tree warmed on the datastore's live (prompt, response)
    pairs; without a datastore, it drafts from the request's own text (and, with
    suffix_share_responses, from the responses this drafter has served)."""
    from dresd.drafters.suffix import SuffixDrafter

    drafter = SuffixDrafter(max_tree_depth=spec.suffix_max_depth, max_spec_factor=spec.suffix_spec_factor,
                            min_token_prob=spec.suffix_min_prob, eos_id=eos_id,
                            cached_responses=spec.suffix_cached_responses,
                            share_responses=spec.suffix_share_responses)
    if store is not None:
        drafter.warm(store_pairs(store, tokenizer))
    return drafter


# ----------------------------------------------------------------------------- built-in methods


def _prompt_lookup(spec: SpeculativeConfig, store, tokenizer, eos_id: int) -> Drafter:
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    return PromptLookupDrafter(spec.pld_max_ngram, spec.pld_min_ngram, spec.pld_tokens, spec.pld_matches, eos_id)


def _dense(spec: SpeculativeConfig, store: Datastore, tokenizer, eos_id: int) -> Drafter:
    """dresd: the datastore's neighbours (+ the request's own keys); hybrid: + exact matches."""
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.hybrid import HybridDrafter
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    dense: list[Drafter] = [DenseDrafter(store, spec)]
    if spec.context_keys:
        dense.append(ContextDenseDrafter(store.compressor, spec, eos_id))
    if spec.method == "dresd":
        return dense[0] if len(dense) == 1 else HybridDrafter(dense, name="dresd")
    if spec.hybrid_exact == "suffix":
        exact = _suffix_drafter(spec, store, tokenizer, eos_id)
    else:
        exact = PromptLookupDrafter(spec.pld_max_ngram, spec.pld_min_ngram, spec.pld_tokens,
                                    max(3, spec.pld_matches), eos_id)
    # Exact matches complement the dense neighbours where the text repeats itself; the
    # budget ranks every source by its calibrated acceptance.
    return HybridDrafter(dense + [exact])


def _rest(spec: SpeculativeConfig, store: Datastore, tokenizer, eos_id: int) -> Drafter:
    """REST's retrieval as published: our suffix array over the datastore's records."""
    from dresd.drafters.suffix_array import RestSuffixDrafter, SuffixArrayIndex

    index = SuffixArrayIndex.cached(derived_dir(store) / "rest_sa.npz", store.live_records)
    # Only the paths to the best-supported trie nodes: a frequent two-token match has
    # thousands of distinct continuations, and merging all of them costs tens of ms per
    # step. The margin over max_verify leaves the budget room to re-rank by depth.
    return RestSuffixDrafter(index, eos_id, max_nodes=4 * spec.max_verify)


def _rest_dr(spec: SpeculativeConfig, store: Datastore, tokenizer, eos_id: int) -> Drafter:
    """PyPI draftretriever 0.1.1: ADED's trigram-table fork behind REST's interface."""
    from dresd.drafters.rest import RestDrafter, rest_index_from_datastore

    path = Path(spec.rest_index) if spec.rest_index else derived_dir(store) / "rest.idx"
    if spec.rest_index and store.deleted_records().any():
        # A file named in the config is not keyed by this version's tombstones: it may hold
        # deleted records, so a version with deletes drafts from its own derived index.
        warnings.warn(f"rest_index {spec.rest_index} is not used with datastore version {store.version}, "
                      f"which has deleted records: its index is derived from the live records instead",
                      stacklevel=2)
        path = derived_dir(store) / "rest.idx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rest_index_from_datastore(store, path, len(tokenizer))
    return RestDrafter(str(path), eos_id, choices=spec.rest_choices, name="rest-dr")


# What "auto" drafts with: with a datastore, the hybrid of the dense drafts (the datastore's
# neighbours and the request's own keys) and SuffixDecoding in one tree, the budget keeping
# the nodes that pay (docs/speed-study.md#the-default-method: it holds SuffixDecoding's speed
# where the suffix tree drafts well and the dense drafts' where it does not); the dense
# drafts with prompt lookup where SuffixDecoding is not installed; prompt lookup, which needs
# no datastore, without one. Each entry: (method, settings it implies).
AUTO_WITH_DATASTORE = (("hybrid", {"hybrid_exact": "suffix"}), ("hybrid", {"hybrid_exact": "pld"}))
AUTO_WITHOUT_DATASTORE = ("pld", {})


def _installed(settings: dict) -> bool:
    if settings.get("hybrid_exact") != "suffix":
        return True
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError:
        return False
    return True


def auto_spec(spec: SpeculativeConfig, has_datastore: bool) -> SpeculativeConfig:
    """`spec` with "auto" made concrete (a named method is returned as it is)."""
    if spec.method != "auto":
        return spec
    method, settings = (AUTO_WITHOUT_DATASTORE if not has_datastore else
                        next(c for c in AUTO_WITH_DATASTORE if _installed(c[1]) or c == AUTO_WITH_DATASTORE[-1]))
    return replace(spec, method=method, **settings)


def resolve_method(method: str, has_datastore: bool) -> str:
    """The concrete method `method` names ("auto" picks by whether a datastore is at hand)."""
    return auto_spec(SpeculativeConfig(method=method), has_datastore).method


def _auto(spec: SpeculativeConfig, store: Datastore | None, tokenizer, eos_id: int) -> Drafter | None:
    return make_drafter(auto_spec(spec, store is not None), store, tokenizer, eos_id)


for _name, _build, _store in (("greedy", lambda spec, store, tokenizer, eos_id: None, False),
                              ("pld", _prompt_lookup, False), ("dresd", _dense, True), ("hybrid", _dense, True),
                              ("rest", _rest, True), ("rest-dr", _rest_dr, True), ("suffix", _suffix_drafter, False),
                              ("auto", _auto, False)):
    register_method(_name, _build, needs_datastore=_store)


def make_drafter(spec: SpeculativeConfig, store: Datastore | None, tokenizer, eos_id: int) -> Drafter | None:
    """The drafter `spec.method` names (None for plain greedy decoding)."""
    entry = method_entry(spec.method)
    if entry.needs_datastore and store is None:
        raise ValueError(f"method {spec.method!r} needs a datastore (--datastore)")
    return entry.build(spec, store, tokenizer, eos_id)


def drafter_factory(spec: SpeculativeConfig, store: Datastore | None, tokenizer,
                    eos_id: int) -> Callable[[], Drafter | None]:
    """Drafters for the slots of one batch, one per call. The first is built now, so a method
    that cannot draft fails here; the others are its siblings where it offers them (one warmed
    SuffixDecoding tree for every slot, not one warm-up and one copy per slot), else built anew."""
    first = make_drafter(spec, store, tokenizer, eos_id)
    handed = False

    def make() -> Drafter | None:
        nonlocal handed
        if not handed:
            handed = True
            return first
        if first is None:
            return None
        return sibling_of(first) or make_drafter(spec, store, tokenizer, eos_id)

    return make
