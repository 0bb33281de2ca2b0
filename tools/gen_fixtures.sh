#!/usr/bin/env bash
# Generate prefer's model fixtures on a machine with torch + transformers 5.17
# (the GPU machine) and pack them into ONE archive: $OUT/fixtures.tar.gz.
#
#   bash tools/gen_fixtures.sh            # from the repository root; OUT must be set
#   OUT=/tmp/x bash tools/gen_fixtures.sh [--only llama-tiny,gemma2-tiny] [--device cuda]
#
# Unpack at the repository root: tar xzf fixtures.tar.gz  (members start with fixtures/).
# Extra arguments go to tools/gen_fixtures.py. Exits non-zero if any model failed
# (the archive still holds every model that succeeded; see fixtures/reference/MANIFEST.json).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${OUT:-}" ]]; then
    echo "gen_fixtures.sh: OUT is not set (the folder that receives fixtures.tar.gz)" >&2
    exit 2
fi
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

echo "== gen_fixtures.sh: $(date -u +%FT%TZ) on $(hostname)"
"$PY" - <<'PYEOF'
import sys
print("python", sys.version.split()[0])
for mod in ("torch", "transformers", "tokenizers", "safetensors"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # report, let gen_fixtures.py fail with the real error
        print(mod, "NOT IMPORTABLE:", e)
PYEOF

for f in tokenizer.json tokenizer_config.json special_tokens_map.json; do
    if [[ ! -f "fixtures/tokenizer/$f" ]]; then
        echo "gen_fixtures.sh: fixtures/tokenizer/$f is missing (run tools/make_tokenizer.py on the CPU machine)" >&2
        exit 2
    fi
done

# The log travels back beside the archive.
set +e
"$PY" tools/gen_fixtures.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gen_fixtures.log"
status=${PIPESTATUS[0]}
set -e
if [[ -f "$OUT/fixtures.tar.gz" ]]; then
    ls -l "$OUT/fixtures.tar.gz"
    tar tzf "$OUT/fixtures.tar.gz" | wc -l | xargs echo "archive members:"
fi
echo "== gen_fixtures.sh: exit $status"
exit "$status"
