"""The methods the side-by-side benchmark compares, and the choice of them from a comma list.

benchmarks/spec_bench.py runs them; each is a decoding method, the datastore it drafts from
(the in-distribution "id" store, the out-of-distribution "ood" one, or none) and its
settings. Methods added with dresd.drafters.registry.register_method (or a plugin) can be
named too, so a new drafter is compared on the same machinery as the built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from dresd.config import SpeculativeConfig
from dresd.drafters.registry import available_methods


@dataclass
class Method:
    """One row of the report: a decoding method and the datastore it drafts from."""

    name: str
    store: str | None  # "id" / "ood" / None (no datastore)
    spec: SpeculativeConfig | None  # None = an HF generate() reference
    hf_lookup: int | None = None  # HF prompt_lookup_num_tokens
    hf_stock: bool = True  # HF reference on the stock model (False: on our dual-layout model)


# SuffixDecoding as published: every served response drafts for later requests, none dropped
# (the library's default). Serving keeps responses private unless configured otherwise.
SUFFIX_AS_PUBLISHED = dict(suffix_share_responses=True, suffix_cached_responses=1_000_000)


def methods() -> list[Method]:
    """Every compared method; "+budget" = our draft budget applied to a published method."""
    S = SpeculativeConfig
    out = [
        Method("greedy", None, S(method="greedy")),
        Method("hf-greedy", None, None),
        Method("hf-pld", None, None, hf_lookup=10),
        # Diagnostic: HF's loop on our dual-layout weights separates loop cost from layout gain.
        Method("hf-greedy-dual", None, None, hf_stock=False),
        Method("pld", None, S(method="pld", budget="off")),
        Method("pld+budget", None, S(method="pld")),
    ]
    for store in ("id", "ood"):
        tag = "" if store == "id" else "@ood"
        out += [
            Method(f"rest{tag}", store, S(method="rest", budget="off")),
            Method(f"rest-dr{tag}", store, S(method="rest-dr", budget="off")),
            Method(f"suffix{tag}", store, S(method="suffix", budget="off", **SUFFIX_AS_PUBLISHED)),
            Method(f"suffix+budget{tag}", store, S(method="suffix", **SUFFIX_AS_PUBLISHED)),
            Method(f"dresd{tag}", store, S(method="dresd")),
            Method(f"hybrid{tag}", store, S(method="hybrid")),
            Method(f"hybrid-sfx{tag}", store, S(method="hybrid", hybrid_exact="suffix", **SUFFIX_AS_PUBLISHED)),
        ]
        if store == "id":
            out += [
                Method("rest+budget", store, S(method="rest")),
                Method("rest-dr+budget", store, S(method="rest-dr")),
                # Ablation: the datastore alone, without the request's own keys.
                Method("dresd-store", store, S(method="dresd", context_keys=False)),
                # The paper's settings: the datastore alone, everything verified.
                Method("dresd-ref", store, S(method="dresd", budget="off", context_keys=False)),
            ]
    return out


def chosen_methods(names: str) -> list[Method]:
    """The methods a comma list names (every benchmark method when empty), greedy always first.

    A name outside the benchmark's list that is a registered method (a plugin, or one a
    --import module registers) runs on the ID store with the budget on; `name@ood` on the
    OOD store. Any other name is an error: a typo must not shrink a run silently."""
    known = methods()
    if not names:
        return known
    by_name = {m.name: m for m in known}
    out = [by_name["greedy"]]
    for name in dict.fromkeys(n.strip() for n in names.split(",") if n.strip()):
        if name == "greedy":
            continue
        if name in by_name:
            out.append(by_name[name])
            continue
        method, _, store = name.partition("@")
        if method not in available_methods() or store not in ("", "ood"):
            raise ValueError(f"--methods: unknown method {name!r}; benchmark methods: {', '.join(by_name)}; "
                             f"registered methods (on the ID store, or name@ood): {', '.join(available_methods())}")
        # Every one gets the store, not only those that need one: "auto" drafts from it when it
        # is there, as it does for users who give a datastore.
        out.append(Method(name, store or "id", SpeculativeConfig(method=method)))
    return out
