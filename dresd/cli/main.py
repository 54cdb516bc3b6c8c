"""The `dresd` command line: build, update, generate, datastore list|show|verify|prune, cache
show|prune, serve, demo.

Every command loads its config the same way (dresd.config.loader): the dataclass defaults,
then `--config FILE.yaml`, then its flags, then `--set key.sub=value`. A bad value is a
one-line error naming the key, before Ray starts or a model loads (exit code 2).
"""

from __future__ import annotations

import os

# Before numpy and faiss load OpenBLAS: a multi-threaded OpenBLAS product leaves its threads
# spinning for a while, and drafting runs small numpy/faiss products at every step, so on a
# CPU those threads compete with the model's forward for the cores (docs/speed-study.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from dresd.config import (BuildConfig, CacheCommandConfig, CalibrateConfig, ConfigError,  # noqa: E402
                          DatastoreCommandConfig, DemoConfig, GenerateConfig, ServeConfig, SpeculativeConfig,
                          UpdateConfig)
from dresd.config.loader import add_config_arguments, add_flag, config_from_args  # noqa: E402


def _build(cfg: BuildConfig, args: argparse.Namespace) -> int:
    from pipelines.build import build_datastore

    if not cfg.corpus.paths:
        raise ConfigError("no corpus given (--corpus PATH, or corpus.paths in --config or --set)")
    print("\n".join(build_datastore(cfg).lines()))
    return 0


def _update(cfg: UpdateConfig, args: argparse.Namespace) -> int:
    from pipelines.update import compact, delete_sources, reindex, update_datastore

    if args.action == "add":
        if not cfg.corpus.paths:
            raise ConfigError("update add: no corpus given (--corpus PATH)")
        print("\n".join(update_datastore(cfg).lines()))
    elif args.action == "delete":
        if not cfg.sources:
            raise ConfigError("update delete: no source ids given (--source ID)")
        print(f"published {delete_sources(cfg.output, cfg.sources)}")
    elif args.action == "reindex":
        print(f"published {reindex(cfg.output, cfg.index, cfg.check_sample)}")
    else:
        print(f"published {compact(cfg.output)}")
    return 0


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts a generate config names: its texts, then its prompts file's."""
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                if cfg.prompt_field not in row:
                    raise ConfigError(f"{path}: row {i}: field {cfg.prompt_field!r} is missing")
                prompts.append(row[cfg.prompt_field])
            else:
                prompts.append(line)
    if not prompts:
        raise ConfigError("no prompts (--prompt TEXT or --prompts FILE)")
    return prompts


def generate_specs(cfg: GenerateConfig) -> dict[str, SpeculativeConfig]:
    """The methods (x verifiers for dresd) a generate config compares, as named SpeculativeConfigs."""
    specs = {}
    for method in cfg.methods or [cfg.speculative.method]:
        for verify in (cfg.verifiers or [cfg.speculative.verify]) if method == "dresd" else ["tree"]:
            name = method if method == "greedy" else f"{method}-{verify}"
            specs[name] = dataclasses.replace(cfg.speculative, method=method, verify=verify)
    return specs


def _generate(cfg: GenerateConfig, args: argparse.Namespace) -> int:
    prompts = read_prompts(cfg)
    specs = generate_specs(cfg)
    from dresd.drafters.registry import method_entry

    for spec in specs.values():  # before the model loads: a typo or a missing store costs no start-up
        try:
            entry = method_entry(spec.method)
        except ValueError as err:
            raise ConfigError(f"--method (methods, speculative.method): {err}") from None
        if entry.needs_datastore and not cfg.datastore:
            raise ConfigError(f"--method {spec.method!r} drafts from a datastore: give --datastore ROOT "
                              "(or pld, suffix or auto, which draft from the request's own text without one)")
    from dresd.decoding.engine import Engine
    from dresd.evaluation.compare import markdown_table, run_methods, summarize

    engine = Engine.open(cfg.model, cfg.datastore, cfg.prompt_format)
    runs = run_methods(engine, prompts, specs, cfg.max_new_tokens, warmup=len(specs) > 1, sampling=cfg.sampling())
    if cfg.out:
        with open(cfg.out, "w") as fh:
            for name, run in runs.items():
                for prompt, gen in zip(prompts, run.generations):
                    fh.write(json.dumps({"method": name, "prompt": prompt, "text": gen.text,
                                         "token_ids": gen.token_ids, "metrics": gen.metrics.summary()}) + "\n")
    if len(prompts) == 1 and len(runs) == 1:
        print(next(iter(runs.values())).generations[0].text)
    print(markdown_table(summarize(runs)))
    return 0


def _datastore(cfg: DatastoreCommandConfig, args: argparse.Namespace) -> int:
    from dresd.datastore.store import Datastore, DatastoreError, list_versions, read_current, version_manifest

    root = cfg.root
    try:
        if args.action == "list":
            versions = list_versions(root)
            if not versions:
                print(f"{root}: no datastore versions", file=sys.stderr)
                return 1
            current = read_current(root)
            for v in versions:
                ds = version_manifest(root, v)
                mark = "*" if v == current else " "
                print(f"{mark} {v}  keys={ds['counts']['keys']}  tokens={ds['counts']['tokens']}  model={ds['model']['name']}")
            return 0
        if args.action == "prune":
            from dresd.datastore.prune import prune_versions

            if cfg.keep is None:
                raise ConfigError("datastore prune: give --keep N (versions kept up to CURRENT, CURRENT included)")
            print("\n".join(prune_versions(root, cfg.keep).lines()))
            return 0
        if args.action == "verify":  # before opening: a damaged file is reported, not raised
            return _verify(root, cfg.version)
        store = Datastore(root, version=cfg.version)
        if args.action == "show":
            if cfg.json:
                print(json.dumps(store.manifest, indent=2, sort_keys=True))
            else:
                from dresd.datastore.summary import describe

                deleted = int(store.deleted.sum()) if store.deleted is not None else 0
                print("\n".join(describe(store.manifest, deleted, read_current(root))))
        else:
            store.verify()
            print(f"{store.path}: all {len(store.manifest['files'])} files match their checksums")
    except DatastoreError as err:
        print(f"dresd datastore {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


def _verify(root: str, version: str | None) -> int:
    """`dresd datastore verify`: every mismatch of the version on stderr, one line each (exit
    1), or one line saying all is well. DatastoreError when there is no such version."""
    from dresd.datastore.integrity import MANIFEST, find_damage
    from dresd.datastore.store import locate_version

    vdir, expected = locate_version(root, version)
    damage = find_damage(vdir, expected)
    for mismatch in damage:
        print(f"dresd datastore verify: {vdir}: {mismatch}", file=sys.stderr)
    if damage:
        return 1
    files = json.loads((vdir / MANIFEST).read_text())["files"]
    signed = f", and {MANIFEST} matches the checksum in CURRENT" if expected else ""
    print(f"{vdir}: all {len(files)} files match their checksums{signed}")
    return 0


def _cache(cfg: CacheCommandConfig, args: argparse.Namespace) -> int:
    """`dresd cache show`: this node's evictable entries, least recently used first, and who
    uses each; `dresd cache prune`: evict down to the bound now."""
    import time

    from dresd.storage.cache import cache_root
    from dresd.storage.eviction import cache_entries, cache_limit_bytes, evict
    from dresd.storage.leases import live_leases

    limit = cache_limit_bytes()
    if args.action == "prune":
        report = evict(limit)
        print("\n".join(report.lines()))
        return 1 if report.busy else 0
    entries = cache_entries()
    total = sum(e.bytes for e in entries)
    print(f"{cache_root()}: {len(entries)} evictable entries, {total / 1e9:.3f} GB "
          f"(bound {'none' if limit == float('inf') else f'{limit / 1e9:.3f} GB'})")
    for e in entries:
        users = live_leases(e.path, clean=False)
        note = f"  (in use by {'; '.join(users)})" if users else ""
        print(f"  {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.last_used))}  {e.bytes / 1e6:10.1f} MB  "
              f"{e.kind:17}  {e.path}{note}")
    return 0


def _calibrate(cfg: CalibrateConfig, args: argparse.Namespace) -> int:
    """Time again, and cache, what decoding reads on this machine: the CPU layout check (with
    dual_layout "auto") and the verification cost curves the draft budget plans with. Each is
    measured once per machine and setting; one taken while other work shared the machine
    stays wrong until measured again."""
    from dataclasses import replace

    from dresd.decoding.calibration import cached_batch_cost_model, cached_cost_model
    from dresd.model.fastpath.cpu_linear import has_dual_layout
    from dresd.model.loading import choose_layout, load_model

    # Loaded on torch's layers, then given the layout decoding's load would give it, with the
    # layout check ("auto") timed again on the way.
    lm = load_model(replace(cfg.model, dual_layout=False))
    choose_layout(lm.model, cfg.model, refresh=True)
    layers = "the packed CPU kernel" if has_dual_layout(lm.model) else "torch's layers"
    print(f"{lm.identity['name']} on {lm.device}, {lm.dtype}, {layers}")
    if cfg.batch:  # measures the one-sequence curve again too (its batch-1 row)
        batch = cached_batch_cost_model(lm.model, refresh=True)
    cost = cached_cost_model(lm.model, refresh=not cfg.batch)
    print(f"verification cost: one position {1e3 * cost.seconds[0]:.2f} ms; " +
          ", ".join(f"{k}: {v:.2f}x" for k, v in cost.relative().items()))
    if cfg.batch:
        for rows in batch.batches:
            curve = batch.at_batch(rows)
            print(f"batch of {rows}: one position a row {1e3 * curve.seconds[0]:.2f} ms; " +
                  ", ".join(f"{k}: {v:.2f}x" for k, v in curve.relative().items()))
    return 0


def _demo(cfg: DemoConfig, args: argparse.Namespace) -> int:
    from dresd.cli.demo import run_demo

    return run_demo(cfg)


def _serve(cfg: ServeConfig, args: argparse.Namespace) -> int:
    import signal
    import threading

    from dresd.serving.app import api_key_for, check_method, start, stop

    check_method(cfg)  # a method without its datastore, or a missing key, fails before Ray starts
    api_key_for(cfg)
    url = start(cfg)
    print(f"serving {cfg.served_model_name} at {url}/v1 (datastore {cfg.datastore or 'none'}, "
          f"{cfg.replicas} replica(s)); Ctrl-C stops", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    stop(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dresd` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from dresd.datastore.corpus import CorpusError
    from dresd.datastore.errors import DatastoreError
    from dresd.storage.locks import LockTimeout

    try:
        cfg = config_from_args(args.config_cls, args)
        if (cache := getattr(cfg, "cache", None)) is not None:  # before anything fills the cache
            from dresd.storage.eviction import set_cache_limit

            set_cache_limit(cache.max_gb)
        return args.fn(cfg, args)
    except ConfigError as exc:
        print(f"dresd {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except (DatastoreError, CorpusError, LockTimeout) as exc:
        # Errors about the user's data or a busy resource already say what and where: one
        # line, not a traceback (DRESD_TRACEBACK=1 shows it).
        if os.environ.get("DRESD_TRACEBACK"):
            raise
        notes = "".join(f" ({n})" for n in getattr(exc, "__notes__", ()))
        print(f"dresd {args.cmd}: error: {exc}{notes}", file=sys.stderr)
        return 1


def _command(sub, name: str, cls: type, fn, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    add_config_arguments(p, cls)
    p.set_defaults(fn=fn, config_cls=cls)
    return p


def _corpus_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """The corpus flags build and update add share."""
    add_flag(p, "--corpus", cls, "corpus.paths", "corpus file/folder/URI, or 'sharegpt' (repeatable)", append=True)
    add_flag(p, "--kind", cls, "corpus.kind", "record shape")
    add_flag(p, "--prompt-field", cls, "corpus.prompt_field")
    add_flag(p, "--response-field", cls, "corpus.response_field")
    add_flag(p, "--text-field", cls, "corpus.text_field")
    add_flag(p, "--id-field", cls, "corpus.id_field", "field holding a stable source id per record (what delete takes)")
    add_flag(p, "--on-error", cls, "corpus.on_error", "bad rows: skip (counted by reason) or fail")
    add_flag(p, "--model", cls, "model.path", "HF folder or .gguf (default: packaged SmolLM2-135M-Instruct)")
    add_flag(p, "--dtype", cls, "model.dtype", "keys' precision (auto: bfloat16 on CUDA, else float32)")
    add_flag(p, "--address", cls, "ray_address", "Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    """The `dresd` command line: one sub-command per job, each over one config dataclass."""
    p = argparse.ArgumentParser(prog="dresd", description="Dense-retrieval speculative decoding")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = _command(sub, "build", BuildConfig, _build, "corpus -> datastore (Ray Data pipeline)")
    _corpus_flags(b, BuildConfig)
    add_flag(b, "--prompt-format", BuildConfig, "corpus.prompt_format")
    add_flag(b, "--max-records", BuildConfig, "corpus.max_records", "read at most this many rows of each file")
    add_flag(b, "--max-tokens", BuildConfig, "corpus.max_tokens")
    add_flag(b, "--output", BuildConfig, "output", "datastore root (versions are published under it)")
    add_flag(b, "--index-kind", BuildConfig, "index.kind")
    add_flag(b, "--dim", BuildConfig, "index.dim", "PCA dimension of the keys")
    add_flag(b, "--value-len", BuildConfig, "value_len")
    add_flag(b, "--embed-actors", BuildConfig, "embed_actors")

    u = _command(sub, "update", UpdateConfig, _update,
                 "add a corpus, delete sources, compact, or reindex (the layout the index settings "
                 "choose now): each publishes a new version")
    u.add_argument("action", choices=["add", "delete", "compact", "reindex"])
    add_flag(u, "--datastore", UpdateConfig, "output", "datastore root")
    _corpus_flags(u, UpdateConfig)
    add_flag(u, "--source", UpdateConfig, "sources", "delete: a source id (repeatable)", append=True)

    g = _command(sub, "generate", GenerateConfig, _generate, "prompts -> text plus metrics")
    add_flag(g, "--prompt", GenerateConfig, "prompts", "a prompt (repeatable)", append=True)
    add_flag(g, "--prompts", GenerateConfig, "prompts_file", "a .txt (one prompt per line) or .jsonl file")
    add_flag(g, "--prompt-field", GenerateConfig, "prompt_field")
    add_flag(g, "--datastore", GenerateConfig, "datastore", "datastore root or version folder")
    add_flag(g, "--model", GenerateConfig, "model.path", "HF folder or .gguf (default: packaged model)")
    add_flag(g, "--method", GenerateConfig, "methods",
             "greedy, dresd, hybrid, pld, rest, rest-dr, suffix, a registered method, or a comma list (greedy,dresd,pld)")
    add_flag(g, "--budget", GenerateConfig, "speculative.budget",
             "auto: verify only what pays on this machine (measured); off: verify every draft")
    add_flag(g, "--temperature", GenerateConfig, "temperature", "> 0: speculative sampling (lossless)")
    add_flag(g, "--top-p", GenerateConfig, "top_p")
    add_flag(g, "--seed", GenerateConfig, "seed")
    add_flag(g, "--verify", GenerateConfig, "verifiers", "tree, batch, or both: tree,batch")
    add_flag(g, "--prompt-format", GenerateConfig, "prompt_format", "without a datastore only")
    add_flag(g, "--max-new-tokens", GenerateConfig, "max_new_tokens")
    add_flag(g, "--top-k", GenerateConfig, "speculative.top_k")
    add_flag(g, "--num-drafts", GenerateConfig, "speculative.num_drafts")
    add_flag(g, "--len-drafts", GenerateConfig, "speculative.len_drafts")
    add_flag(g, "--no-context-keys", GenerateConfig, "speculative.context_keys",
             "dresd/hybrid: retrieve from the datastore only, not from the request's own keys", negate=True)
    add_flag(g, "--hybrid-exact", GenerateConfig, "speculative.hybrid_exact",
             "hybrid: the exact-match source (prompt lookup or SuffixDecoding)")
    add_flag(g, "--threads", GenerateConfig, "model.threads")
    add_flag(g, "--dtype", GenerateConfig, "model.dtype", "auto: bfloat16 on CUDA, else float32")
    add_flag(g, "--out", GenerateConfig, "out", "write per-request results as jsonl")

    d = _command(sub, "datastore", DatastoreCommandConfig, _datastore,
                 "inspect published datastores, or prune old versions")
    d.add_argument("action", choices=["list", "show", "verify", "prune"])
    # Positional: its dest is the config key it sets, as add_flag's flags are.
    d.add_argument("config:root", nargs="?", default=None, metavar="root", help="datastore root")
    add_flag(d, "--version", DatastoreCommandConfig, "version", "a version id (default: CURRENT)")
    add_flag(d, "--json", DatastoreCommandConfig, "json", "show: the manifest as json", switch=True)
    add_flag(d, "--keep", DatastoreCommandConfig, "keep",
             "prune: versions kept up to CURRENT, CURRENT included; older ones are removed")

    c = _command(sub, "cache", CacheCommandConfig, _cache,
                 "this node's cache: list its evictable entries, or evict down to the bound")
    c.add_argument("action", choices=["show", "prune"])
    add_flag(c, "--max-gb", CacheCommandConfig, "cache.max_gb",
             "the bound in GB (default: $DRESD_CACHE_MAX_GB, else 50)")

    s = _command(sub, "serve", ServeConfig, _serve,
                 "an OpenAI-compatible HTTP endpoint (Ray Serve) decoding with a datastore")
    add_flag(s, "--datastore", ServeConfig, "datastore", "datastore root (CURRENT is followed between requests)")
    add_flag(s, "--model", ServeConfig, "model.path", "HF folder or .gguf (default: packaged model)")
    add_flag(s, "--method", ServeConfig, "speculative.method", "the replicas' default method")
    add_flag(s, "--replicas", ServeConfig, "replicas")
    add_flag(s, "--max-batch", ServeConfig, "max_batch", "sequences per forward in a replica")
    add_flag(s, "--host", ServeConfig, "host", "bind address (not loopback: an API key is required)")
    add_flag(s, "--port", ServeConfig, "port")
    add_flag(s, "--address", ServeConfig, "ray_address", "Ray cluster address (default: RAY_ADDRESS or a local Ray)")

    k = _command(sub, "calibrate", CalibrateConfig, _calibrate,
                 "measure again this machine's CPU layout check and the verification cost the draft budget reads")
    add_flag(k, "--model", CalibrateConfig, "model.path", "HF folder or .gguf (default: packaged model)")
    add_flag(k, "--threads", CalibrateConfig, "model.threads")
    add_flag(k, "--dtype", CalibrateConfig, "model.dtype", "auto: bfloat16 on CUDA, else float32")
    add_flag(k, "--batch", CalibrateConfig, "batch", "also the batched curve (rows x positions per row)", switch=True)

    m = _command(sub, "demo", DemoConfig, _demo,
                 "build a ShareGPT datastore with the packaged model, then compare methods")
    add_flag(m, "--workdir", DemoConfig, "workdir")
    add_flag(m, "--prompts", DemoConfig, "prompts", "held-out prompts to decode")
    add_flag(m, "--records", DemoConfig, "records", "ShareGPT records in the datastore")
    add_flag(m, "--max-new-tokens", DemoConfig, "max_new_tokens")
    return p


if __name__ == "__main__":
    sys.exit(main())
