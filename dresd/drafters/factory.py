"""One place that turns a SpeculativeConfig's method into a drafter.

Retrieval baselines are built from the very corpus token streams of the dense datastore
(its tokens.npy and record offsets), so every method drafts from the same text.
"""

from __future__ import annotations

from pathlib import Path

from dresd.config import SpeculativeConfig
from dresd.datastore import Datastore
from dresd.drafters import Drafter
from dresd.formatting import response_header, shared_prefix_len, split_record
from dresd.models import cache_root

NEEDS_DATASTORE = ("dresd", "rest", "rest-dr", "suffix", "hybrid")


def derived_dir(store: Datastore) -> Path:
    """Cache folder for artifacts derived from one datastore version (keyed by its token stream)."""
    base = cache_root()
    digest = store.manifest.get("files", {}).get("tokens.npy", {}).get("sha256") or store.version
    return base / "derived" / f"{store.version}-{str(digest)[:12]}"


def store_records(store: Datastore):
    """Every record of the datastore as a list of token ids, in order."""
    offsets = store.record_offsets
    for i in range(len(offsets) - 1):
        yield store.tokens[offsets[i] : offsets[i + 1]].tolist()


def store_pairs(store: Datastore, tokenizer):
    """(prompt ids, response ids) of every datastore record, split after the response header."""
    fmt = store.manifest["prompt_format"]["name"]
    header, head = response_header(tokenizer, fmt), shared_prefix_len(tokenizer, fmt)
    for record in store_records(store):
        prompt, response = split_record(record, header, head)
        if response and response[-1] == store.eos_id:
            response = response[:-1]
        yield prompt, response


def _suffix_drafter(spec: SpeculativeConfig, store: Datastore, tokenizer, eos_id: int):
    """SuffixDecoding with its global tree warmed on the datastore's (prompt, response) pairs."""
    from dresd.drafters.suffix import SuffixDrafter

    drafter = SuffixDrafter(max_tree_depth=spec.suffix_max_depth, max_spec_factor=spec.suffix_spec_factor,
                            min_token_prob=spec.suffix_min_prob, eos_id=eos_id)
    drafter.warm(store_pairs(store, tokenizer))
    return drafter


def make_drafter(spec: SpeculativeConfig, store: Datastore | None, tokenizer, eos_id: int) -> Drafter | None:
    """The drafter `spec.method` names (None for plain greedy decoding)."""
    from dresd.drafters.dense import ContextDenseDrafter, DenseDrafter
    from dresd.drafters.hybrid import HybridDrafter
    from dresd.drafters.prompt_lookup import PromptLookupDrafter

    method = spec.method
    if method == "greedy":
        return None
    if method in NEEDS_DATASTORE and store is None:
        raise ValueError(f"method {method!r} needs a datastore (--datastore)")
    if method == "pld":
        return PromptLookupDrafter(spec.pld_max_ngram, spec.pld_min_ngram, spec.pld_tokens, spec.pld_matches, eos_id)
    if method in ("dresd", "hybrid"):
        dense: list[Drafter] = [DenseDrafter(store, spec)]
        if spec.context_keys:
            dense.append(ContextDenseDrafter(store.compressor, spec, eos_id))
        if method == "dresd":
            return dense[0] if len(dense) == 1 else HybridDrafter(dense, name="dresd")
        if spec.hybrid_exact == "suffix":
            exact = _suffix_drafter(spec, store, tokenizer, eos_id)
        else:
            exact = PromptLookupDrafter(spec.pld_max_ngram, spec.pld_min_ngram, spec.pld_tokens,
                                        max(3, spec.pld_matches), eos_id)
        # Exact matches complement the dense neighbours where the text repeats itself; the
        # budget ranks every source by its calibrated acceptance.
        return HybridDrafter(dense + [exact])
    if method == "rest":
        # REST's retrieval as published: our suffix array over the datastore's records.
        from dresd.drafters.suffix_array import RestSuffixDrafter, SuffixArrayIndex

        index = SuffixArrayIndex.cached(derived_dir(store) / "rest_sa.npz", lambda: store_records(store))
        # Only the paths to the best-supported trie nodes: a frequent two-token match has
        # thousands of distinct continuations, and merging all of them costs tens of ms per
        # step. The margin over max_verify leaves the budget room to re-rank by depth.
        return RestSuffixDrafter(index, eos_id, max_nodes=4 * spec.max_verify)
    if method == "rest-dr":
        # PyPI draftretriever 0.1.1: ADED's trigram-table fork behind REST's interface.
        from dresd.drafters.rest import RestDrafter, rest_index_from_datastore

        path = Path(spec.rest_index) if spec.rest_index else derived_dir(store) / "rest.idx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rest_index_from_datastore(store, path, len(tokenizer))
        return RestDrafter(str(path), eos_id, choices=spec.rest_choices, name="rest-dr")
    if method == "suffix":
        return _suffix_drafter(spec, store, tokenizer, eos_id)
    raise ValueError(f"unknown method {method!r}")
