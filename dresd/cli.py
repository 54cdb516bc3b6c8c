"""The `dresd` command line: build, update, generate, datastore list|show|verify, demo."""

from __future__ import annotations

import os

# Before numpy and faiss load OpenBLAS: a multi-threaded OpenBLAS product leaves its threads
# spinning for a while, and drafting runs small numpy/faiss products at every step, so on
# a CPU those threads compete with the model's forward for the cores. Measured on 2 cores,
# 8 MT-Bench prompts x 128 tokens (OpenMP's default wait policy): DReSD 76-78 -> 88-92
# tokens/s (0.87-0.91x -> 1.05-1.07x greedy); greedy and SuffixDecoding unchanged.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from dresd.config import BuildConfig, ModelConfig, SpeculativeConfig, load_yaml


def _build(args: argparse.Namespace) -> int:
    from pipelines.build import build_datastore

    cfg = load_yaml(BuildConfig, args.config) if args.config else BuildConfig()
    if args.corpus:
        cfg.corpus.paths = args.corpus
    for flag, target, attr in [
        ("kind", cfg.corpus, "kind"), ("prompt_field", cfg.corpus, "prompt_field"), ("id_field", cfg.corpus, "id_field"),
        ("response_field", cfg.corpus, "response_field"), ("text_field", cfg.corpus, "text_field"),
        ("prompt_format", cfg.corpus, "prompt_format"), ("max_records", cfg.corpus, "max_records"),
        ("max_tokens", cfg.corpus, "max_tokens"), ("on_error", cfg.corpus, "on_error"),
        ("output", cfg, "output"), ("model", cfg.model, "path"), ("index_kind", cfg.index, "kind"),
        ("dim", cfg.index, "dim"), ("value_len", cfg, "value_len"), ("embed_actors", cfg, "embed_actors"),
        ("address", cfg, "ray_address"),
    ]:
        value = getattr(args, flag)
        if value is not None:
            setattr(target, attr, value)
    if not cfg.corpus.paths:
        print("dresd build: no corpus given (--corpus PATH or corpus.paths in --config)", file=sys.stderr)
        return 2
    report = build_datastore(cfg)
    print("\n".join(report.lines()))
    return 0


def _update(args: argparse.Namespace) -> int:
    from pipelines.update import compact, delete_sources, update_datastore

    if args.action == "add":
        if not args.corpus:
            print("dresd update add: no corpus given (--corpus PATH)", file=sys.stderr)
            return 2
        cfg = BuildConfig(output=args.datastore, keep_work=False)
        cfg.corpus.paths = args.corpus
        cfg.model.path = args.model
        for flag, attr in [("kind", "kind"), ("prompt_field", "prompt_field"), ("response_field", "response_field"),
                           ("text_field", "text_field"), ("id_field", "id_field"), ("on_error", "on_error")]:
            if getattr(args, flag) is not None:
                setattr(cfg.corpus, attr, getattr(args, flag))
        print("\n".join(update_datastore(cfg).lines()))
    elif args.action == "delete":
        print(f"published {delete_sources(args.datastore, args.source)}")
    else:
        print(f"published {compact(args.datastore)}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                if args.prompt_field not in row:
                    raise SystemExit(f"{path}: row {i}: field {args.prompt_field!r} is missing")
                prompts.append(row[args.prompt_field])
            else:
                prompts.append(line)
    if not prompts:
        raise SystemExit("dresd generate: no prompts (--prompt TEXT or --prompts FILE)")
    return prompts


def generate_specs(args: argparse.Namespace) -> dict[str, SpeculativeConfig]:
    """`dresd generate`'s methods (x verifiers for dresd) as named SpeculativeConfigs."""
    specs = {}
    for method in args.method.split(","):
        for verify in (args.verify.split(",") if method == "dresd" else ["tree"]):
            name = method if method == "greedy" else f"{method}-{verify}"
            specs[name] = SpeculativeConfig(method=method, verify=verify, top_k=args.top_k, budget=args.budget,
                                            num_drafts=args.num_drafts, len_drafts=args.len_drafts,
                                            context_keys=not args.no_context_keys, hybrid_exact=args.hybrid_exact)
    return specs


def _generate(args: argparse.Namespace) -> int:
    from dresd.engine import Engine
    from dresd.evaluate import markdown_table, run_methods, summarize

    prompts = _read_prompts(args)
    engine = Engine.open(ModelConfig(path=args.model, threads=args.threads), args.datastore, args.prompt_format)
    specs = generate_specs(args)
    sampling = None
    if args.temperature > 0:
        from dresd.acceptance import SamplingParams

        sampling = SamplingParams(args.temperature, args.top_p, args.seed)
    runs = run_methods(engine, prompts, specs, args.max_new_tokens, warmup=len(specs) > 1, sampling=sampling)
    if args.out:
        with open(args.out, "w") as fh:
            for name, run in runs.items():
                for prompt, gen in zip(prompts, run.generations):
                    fh.write(json.dumps({"method": name, "prompt": prompt, "text": gen.text,
                                         "token_ids": gen.token_ids, "metrics": gen.metrics.summary()}) + "\n")
    if len(prompts) == 1 and len(runs) == 1:
        print(next(iter(runs.values())).generations[0].text)
    print(markdown_table(summarize(runs)))
    return 0


def _datastore(args: argparse.Namespace) -> int:
    from dresd.datastore import Datastore, DatastoreError, list_versions, read_current, version_manifest

    root = args.root
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
        store = Datastore(root, version=args.version)
        if args.action == "show":
            print(json.dumps(store.manifest, indent=2, sort_keys=True))
        else:
            store.verify()
            print(f"{store.path}: all {len(store.manifest['files'])} files match their checksums")
    except DatastoreError as err:
        print(f"dresd datastore {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dresd.demo import run_demo

    return run_demo(Path(args.workdir), args.prompts, args.max_new_tokens, args.records)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dresd` console script."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


def build_parser() -> argparse.ArgumentParser:
    """The `dresd` command line: one sub-command per job."""
    p = argparse.ArgumentParser(prog="dresd", description="Dense-retrieval speculative decoding")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="corpus -> datastore (Ray Data pipeline)")
    b.add_argument("--config", help="BuildConfig YAML; flags below override it")
    b.add_argument("--corpus", action="append", help="corpus file/folder, or 'sharegpt' (repeatable)")
    b.add_argument("--kind", choices=["prompt_response", "text", "conversations"])
    b.add_argument("--prompt-field"), b.add_argument("--response-field"), b.add_argument("--text-field")
    b.add_argument("--id-field", help="field holding a stable source id per record (for deletes)")
    b.add_argument("--prompt-format", choices=["chat", "qa"])
    b.add_argument("--max-records", type=int), b.add_argument("--max-tokens", type=int)
    b.add_argument("--on-error", choices=["skip", "fail"])
    b.add_argument("--output", help="datastore root (versions are published under it)")
    b.add_argument("--model", help="HF folder or .gguf (default: packaged SmolLM2-135M-Instruct)")
    b.add_argument("--index-kind", choices=["auto", "flat", "ivfpq"])
    b.add_argument("--dim", type=int), b.add_argument("--value-len", type=int)
    b.add_argument("--embed-actors", type=int)
    b.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    b.set_defaults(fn=_build)

    u = sub.add_parser("update", help="add a corpus, delete sources, or compact: each publishes a new version")
    u.add_argument("action", choices=["add", "delete", "compact"])
    u.add_argument("--datastore", required=True, help="datastore root")
    u.add_argument("--corpus", action="append", help="add: new corpus file/folder (repeatable)")
    u.add_argument("--kind", choices=["prompt_response", "text", "conversations"])
    u.add_argument("--prompt-field"), u.add_argument("--response-field"), u.add_argument("--text-field")
    u.add_argument("--id-field", help="field holding a stable source id (what delete takes)")
    u.add_argument("--on-error", choices=["skip", "fail"])
    u.add_argument("--model", help="must be the datastore's model (default: packaged)")
    u.add_argument("--source", action="append", default=[], help="delete: a source id (repeatable)")
    u.set_defaults(fn=_update)

    g = sub.add_parser("generate", help="prompts -> text plus metrics")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a .txt (one prompt per line) or .jsonl file")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--datastore", help="datastore root or version folder")
    g.add_argument("--model", help="HF folder or .gguf (default: packaged model)")
    g.add_argument("--method", default="dresd",
                   help="greedy, dresd, hybrid, pld, rest, rest-dr, suffix, a registered method, or a comma list (e.g. greedy,dresd,pld)")
    g.add_argument("--budget", default="auto", choices=["auto", "off"],
                   help="auto: verify only what pays on this machine (measured); off: verify every draft")
    g.add_argument("--temperature", type=float, default=0.0, help="> 0: speculative sampling (lossless)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--verify", default="tree", help="tree, batch, or both: tree,batch")
    g.add_argument("--prompt-format", default="chat", choices=["chat", "qa"], help="without a datastore only")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--num-drafts", type=int, default=10)
    g.add_argument("--len-drafts", type=int, default=10)
    g.add_argument("--no-context-keys", action="store_true",
                   help="dresd/hybrid: retrieve from the datastore only, not from the request's own keys")
    g.add_argument("--hybrid-exact", default="pld", choices=["pld", "suffix"],
                   help="hybrid: the exact-match source (prompt lookup or SuffixDecoding)")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--out", help="write per-request results as jsonl")
    g.set_defaults(fn=_generate)

    d = sub.add_parser("datastore", help="inspect published datastores")
    d.add_argument("action", choices=["list", "show", "verify"])
    d.add_argument("root")
    d.add_argument("--version", help="a version id (default: CURRENT)")
    d.set_defaults(fn=_datastore)

    m = sub.add_parser("demo", help="build a ShareGPT datastore with the packaged model, then compare methods")
    m.add_argument("--workdir", default="runs/demo")
    m.add_argument("--prompts", type=int, default=8, help="held-out prompts to decode")
    m.add_argument("--records", type=int, default=200, help="ShareGPT records in the datastore")
    m.add_argument("--max-new-tokens", type=int, default=48)
    m.set_defaults(fn=_demo)

    return p


if __name__ == "__main__":
    sys.exit(main())
