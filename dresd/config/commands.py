"""One config per command and job, built from the shared sections in dresd.config.schema:
`dresd build|update|generate|datastore|demo`, jobs/build.py and jobs/decode.py all load theirs
with dresd.config.loader (defaults, YAML, flags, `--set`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dresd.config.schema import (CacheConfig, CorpusConfig, IndexConfig, ModelConfig, SamplingParams,
                                 SpeculativeConfig, sampling_problems)

# Prompt sets the decode job reads from the installed packages by name.
PACKAGED_PROMPTS = ("mtbench", "sharegpt")


@dataclass
class BuildConfig:
    """A datastore build: corpus -> embeddings -> compressed keys -> index + token stream."""

    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    # Output datastore root: a local folder or a pyarrow filesystem URI (s3://, gs://,
    # hdfs://, file://...) that every node of the cluster can reach.
    output: str = "datastore"
    # Value length N: tokens after each key that the store returns as draft material.
    value_len: int = 20
    # Records per embedding forward (length-sorted within a shard, padded within a batch).
    batch_size: int = 8
    # Corpus rows per shard: the unit of parallel embedding, of index filling and of resumption.
    shard_rows: int = 500
    # Keep the build's work folder (`<work_dir>/<key>/`: shard files) after publishing.
    keep_work: bool = False
    # Scratch folder for embedded shards and fill outputs: what makes a build resumable.
    # Every Ray node must reach it: a local folder (one machine or a shared mount) or a URI
    # (mirrored per node, see pipelines/scratch.py). None = `<output>/.build`.
    work_dir: str | None = None
    # Embedding actors (each loads the model once).
    embed_actors: int = 1
    # CPUs each embedding actor reserves in Ray's accounting. Below the thread count on a
    # small machine, so the read/tokenize stages still get scheduled beside it.
    embed_cpus: float = 1.0
    # torch threads inside each embedding actor (0 = its node's physical cores; set it when
    # several actors share a node).
    embed_threads: int = 0
    # GPUs each embedding actor requests: -1 = one when the cluster has GPUs, else none;
    # 0 = CPU only; a fraction shares a GPU between actors.
    embed_gpus: float = -1.0
    # Ray address (None = RAY_ADDRESS or a fresh local Ray).
    ray_address: str | None = None
    # Keys scored by the intrinsic check (recall@50 vs exact, self-retrieval MRR).
    check_sample: int = 500
    # Which keys the compressor (z-score + PCA) is fitted on before the one streaming pass
    # (pipelines/fit.py); both draw index.sample_size keys with index.seed. "sample": the keys
    # of whole records in a seeded random order, so only about sample_size tokens are embedded
    # for the fit. "all": keys drawn uniformly from the whole corpus (the reservoir the build
    # used before fit-first), which embeds every record once more; kept to measure the sample
    # against (docs/index-layout.md#fit-first). Either way the index trains after the pass, on
    # stored keys drawn uniformly.
    fit: Literal["sample", "all"] = "sample"
    # The bound on every node's cache (fetched versions, corpus copies, scratch mirrors).
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class UpdateConfig(BuildConfig):
    """`dresd update add|delete|compact|reindex`: a build's settings for the corpus added
    (`output` is the datastore root; an add keeps the store's index and compression, a reindex
    lays its keys out as `index` chooses), plus the sources a delete removes."""

    # The datastore root to update (`--datastore`); required.
    output: str = ""
    # delete: source ids to remove (the `id_field` values the records were built with).
    sources: list[str] = field(default_factory=list)
    # The update job (jobs/update.py) only: compact after its add and delete (drop the
    # tombstoned keys and records). `dresd update` takes the action on its command line.
    compact: bool = False
    # The update job only: last, lay the keys out again in the layout `index` chooses for
    # their count (pipelines.update.reindex); a layout equal to the store's is skipped.
    reindex: bool = False

    def problems(self) -> list[str]:
        return [] if self.output else ["output is empty (give the datastore root: --datastore ROOT)"]


@dataclass
class GenerateConfig:
    """A decoding run over a set of prompts."""

    model: ModelConfig = field(default_factory=ModelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # Datastore folder (required for method "dresd").
    datastore: str | None = None
    # New tokens per prompt at most (generation also stops at EOS).
    max_new_tokens: int = 128
    # Prompts to decode, as text (the CLI's repeatable --prompt).
    prompts: list[str] = field(default_factory=list)
    # A file of more prompts: .txt (one a line) or .jsonl (`prompt_field` of each row).
    prompts_file: str | None = None
    # The prompt field of a .jsonl prompts file.
    prompt_field: str = "prompt"
    # Prompt layout when there is no datastore (a datastore decodes with its own format).
    prompt_format: Literal["chat", "qa"] = "chat"
    # Methods decoded side by side, each with `speculative`'s other settings (empty = just
    # speculative.method); a table compares them.
    methods: list[str] = field(default_factory=list)
    # Verifiers compared for method "dresd" (empty = just speculative.verify).
    verifiers: list[Literal["tree", "batch"]] = field(default_factory=list)
    # 0 = greedy; > 0 = speculative sampling at this temperature (lossless).
    temperature: float = 0.0
    # Nucleus sampling mass (1.0 = plain temperature sampling). Ignored when greedy.
    top_p: float = 1.0
    # Sampling seed (None = a fresh random seed per run).
    seed: int | None = None
    # Write each request's text, token ids and metrics here as jsonl (None = only the table).
    out: str | None = None
    # The bound on this node's cache (a URI datastore's fetched versions, derived indexes).
    cache: CacheConfig = field(default_factory=CacheConfig)

    def problems(self) -> list[str]:
        out = sampling_problems(self.temperature, self.top_p)
        if self.max_new_tokens < 0:
            out.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        return out

    def sampling(self) -> SamplingParams | None:
        """The sampling parameters, or None for greedy decoding."""
        return SamplingParams(self.temperature, self.top_p, self.seed) if self.temperature > 0 else None




@dataclass
class DecodeConfig:
    """Prompts dataset -> Ray Data decode stage -> parquet part files (and optionally a corpus)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # Prompt source: a .jsonl / .json / .parquet file, a `datasets.save_to_disk` folder,
    # or "mtbench" (80 MT-Bench first turns) / "sharegpt" (deduplicated ShareGPT first turns).
    prompts: str = "mtbench"
    # Field holding the prompt text in a file source (ignored for the packaged sets).
    prompt_field: str = "prompt"
    # Field holding a stable row id in a file source (None = "<file name>:<row>").
    id_field: str | None = None
    # Skip this many rows of the source first (after which `limit` counts).
    skip: int = 0
    # Decode at most this many rows (None = all the rest).
    limit: int | None = None
    # Prompt layout: the tokenizer's chat template or "Question: ...\nAnswer:\n".
    prompt_format: Literal["chat", "qa"] = "chat"
    # Prompts longer than this many tokens (formatted) are rejected as "too_long"
    # (None = only those that leave no room in the model's context).
    max_prompt_tokens: int | None = 1024
    # New tokens per row at most (a row also stops at EOS).
    max_new_tokens: int = 128
    # 0 = greedy; > 0 = temperature sampling (with top_p), seeded per batch from `seed`.
    temperature: float = 0.0
    # Nucleus sampling mass (1.0 = plain temperature sampling). Ignored when greedy.
    top_p: float = 1.0
    # Sampling seed: batch b of chunk c draws from a generator seeded by (seed, c, b).
    seed: int = 0
    # Drafting for the batch: "auto" = the default method (dresd.drafters.registry.
    # auto_spec) with the draft budget choosing per step how many positions each
    # sequence verifies at this batch size (dresd.decoding.batch_plan; none when drafts do
    # not pay); "greedy" = plain batched decoding (dresd.decoding.batch); any other method
    # drafts per sequence and verifies every sequence's tree in one forward
    # (dresd.decoding.batch_spec). Greedy output is the same whatever the method.
    speculative: SpeculativeConfig = field(default_factory=lambda: SpeculativeConfig(method="auto"))
    # Datastore root or version folder the drafts come from (methods that need one); its
    # prompt format must be `prompt_format`.
    datastore: str | None = None
    # Sequences per forward inside an actor (rows of a chunk are length-sorted first).
    batch_size: int = 8
    # Rows per chunk: one chunk = one parquet part = the unit of scheduling and resumption.
    chunk_rows: int = 64
    # Output folder of the part files (part-<chunk>.parquet).
    output: str = "runs/decode/mtbench"
    # Decoding actors (each loads the model once).
    actors: int = 1
    # CPUs each actor reserves in Ray's accounting (below its thread count on small machines).
    actor_cpus: float = 1.0
    # torch threads per actor (0 = this node's cores / actors).
    threads: int = 0
    # GPUs per actor (0 = CPU only).
    gpus: float = 0.0
    # OMP_WAIT_POLICY in the actors' environment (None = the OpenMP default, spin-waiting).
    # PASSIVE: spinning threads on a node that other processes share wait at barriers while
    # their partner is descheduled; docs/speed-study.md#openmp-and-openblas-threads.
    omp_wait_policy: str | None = "PASSIVE"
    # Ray address (None = RAY_ADDRESS or a fresh local Ray).
    ray_address: str | None = None
    # Also write an in-distribution corpus: jsonl of {"id", "prompt", "response"} records
    # (the model's own replies), ready for `dresd build --corpus FILE`.
    id_corpus: bool = False
    # Where the corpus goes (None = "<output>.jsonl", next to the output folder).
    corpus_file: str | None = None
    # The bound on every node's cache (a URI datastore's fetched versions, derived indexes).
    cache: CacheConfig = field(default_factory=CacheConfig)

    def problems(self) -> list[str]:
        out = sampling_problems(self.temperature, self.top_p)
        if self.max_new_tokens < 0:
            out.append("max_new_tokens must be >= 0")
        if self.batch_size < 1 or self.chunk_rows < 1 or self.actors < 1:
            out.append("batch_size, chunk_rows, actors must be >= 1")
        if self.skip < 0 or (self.limit is not None and self.limit < 0):
            out.append("skip and limit must be >= 0")
        return out


@dataclass
class DatastoreCommandConfig:
    """`dresd datastore list|show|verify|prune`: which published datastore to inspect or prune."""

    # Datastore root (the folder or URI that holds versions/ and CURRENT).
    root: str = ""
    # A version id (None = the one CURRENT names).
    version: str | None = None
    # `show`: print the manifest as json instead of the readable summary.
    json: bool = False
    # `prune`: versions kept up to CURRENT, CURRENT included (required there; >= 1).
    keep: int | None = None

    def problems(self) -> list[str]:
        out = [] if self.root else ["root is empty (give the datastore root)"]
        if self.keep is not None and self.keep < 1:
            out.append(f"keep must be >= 1 (CURRENT counts as one), got {self.keep}")
        return out


@dataclass
class CacheCommandConfig:
    """`dresd cache show|prune`: this node's cache, its entries and their bound."""

    # `prune` evicts down to cache.max_gb (`--max-gb`); `show` prints it beside the total.
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class CalibrateConfig:
    """`dresd calibrate`: measure again what decoding on this machine reads from its cache."""

    # The model as decoding loads it: its path, device, threads and dtype, and with
    # dual_layout "auto" the CPU layout check, which is timed again first.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Also the batched curve (rows x positions per row) that batched decoding, the decode job
    # and the server's replicas read; off, only the one-sequence curve `dresd generate` reads.
    batch: bool = False


@dataclass
class DemoConfig:
    """`dresd demo`: a ShareGPT datastore from the packaged model, then methods compared."""

    # Folder for the corpus, the datastore and the results (reused by a second run).
    workdir: str = "runs/demo"
    # Held-out ShareGPT prompts to decode.
    prompts: int = 8
    # ShareGPT records in the datastore.
    records: int = 200
    # New tokens per prompt at most.
    max_new_tokens: int = 48


# Hosts that only this machine reaches: there an API key is optional (dresd.serving.app).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """`dresd serve` and the Serve config file's app builder (dresd.serving.app.build_app):
    an OpenAI-compatible HTTP app whose replicas decode with continuous batching."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # The replicas' default method and its settings; a request's `dresd` object may choose
    # another method or budget for itself.
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # Datastore root the replicas follow (CURRENT between requests, or the root's pin).
    # None: methods that need no datastore only (greedy, pld, ...).
    datastore: str | None = None
    # Prompt layout without a datastore (a datastore decodes with the format it was built with).
    prompt_format: Literal["chat", "qa"] = "chat"
    # The model id /v1/models lists and responses carry (requests may name any model).
    served_model_name: str = "dresd"
    # Address the HTTP proxy binds. Anything but loopback needs an API key (api_key_env).
    host: str = "127.0.0.1"
    # HTTP port.
    port: int = 8000
    # Decoding replicas, each loading the model once and decoding its own batch (one light
    # HTTP ingress replica, no model, sits in front of them: dresd.serving.app).
    replicas: int = 1
    # CPUs each replica reserves in Ray's accounting (below its torch threads on small machines).
    replica_cpus: float = 1.0
    # GPUs each replica requests (0 = CPU only; a fraction shares a GPU).
    replica_gpus: float = 0.0
    # Sequences one replica decodes per forward at most (BatchedSpeculativeDecoder.max_batch);
    # requests beyond it wait inside the replica and join between steps.
    max_batch: int = 8
    # Requests one replica holds at once (decoding and waiting for a slot); Serve queues more.
    max_ongoing_requests: int = 16
    # Requests Serve queues for the whole app beyond the replicas' ongoing ones (retries of
    # requests whose replica died included); the excess is answered 503 with Retry-After
    # (-1 = no limit).
    max_queued_requests: int = 64
    # The Retry-After those 503 answers carry, in seconds (rounded up).
    retry_after_s: float = 1.0
    # Seconds a request may take from arrival to its last token, a retry included; past it
    # the request is cancelled and answered 504 (a stream ends with an error event).
    request_timeout_s: float = 300.0
    # max_tokens when a request gives none.
    default_max_tokens: int = 128
    # Largest request body accepted, in bytes (larger: 413).
    max_body_bytes: int = 1_000_000
    # Environment variable holding the API key (bearer token) the app requires when set.
    # Required when `host` is not loopback; the key itself never enters a config file.
    api_key_env: str = "DRESD_API_KEY"
    # The bound on each replica node's cache (a URI datastore's fetched versions, derived
    # indexes); versions a replica has open or the root pins are never evicted.
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Serve application name and the route prefix it answers under.
    app_name: str = "dresd"
    route_prefix: str = "/"
    # Ray address (None = RAY_ADDRESS or a fresh local Ray).
    ray_address: str | None = None

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.port < 65536:
            out.append(f"port must be in 1..65535, got {self.port}")
        for name in ("replicas", "max_batch", "max_ongoing_requests", "default_max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < -1:
            out.append(f"max_queued_requests must be >= 0 or -1 (no limit), got {self.max_queued_requests}")
        if not self.request_timeout_s > 0:
            out.append(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not self.retry_after_s >= 0:
            out.append(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.speculative.verify != "tree":
            out.append("speculative.verify must be 'tree' (replicas verify every sequence's tree in one batch)")
        return out
