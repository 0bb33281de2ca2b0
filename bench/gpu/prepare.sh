#!/usr/bin/env bash
# bench/gpu/prepare.sh — runs HERE (the CPU machine): builds what bench/gpu/run.sh needs on the
# GPU machine into .gpu/ (git-ignored), which the device call then carries:
#
#   .gpu/bin/prefer                 the release binary (stripped: `strip = true` in the profile)
#   .gpu/bin/engine-cuda_parity     the engine's GPU test binary
#   .gpu/bin/model-cuda_parity      the model's GPU test binary
#   .gpu/bin/sample-gpu_generation  the generation engine's GPU test binary
#   .gpu/bin/cuda_bench             the engine's kernel micro-benchmarks, if the example exists
#   .gpu/env.sh, install-wheels.sh  from shared/device (env.sh points the loader at CUDA 13)
#   .gpu/scripts/                   run.sh's helpers, score_hf.py, make_random_model.py
#
# Test executables are found from cargo's JSON messages, not guessed from target/ names.
# Fails if .gpu/ would exceed 60 MiB (the device call carries at most 64 MiB in all).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=${PREFER_SHARED:-$root/../shared}
[ -d "$shared/device" ] || shared=/work/shared
G=.gpu

echo "+ cargo build --release -p prefer"
cargo build --release -p prefer
have_bench=0
if [ -f crates/engine/examples/cuda_bench.rs ]; then
    echo "+ cargo build --release -p engine --example cuda_bench"
    cargo build --release -p engine --example cuda_bench && have_bench=1
fi
echo "+ cargo test --release --no-run -p engine -p model -p sample --message-format=json"
cargo test --release --no-run -p engine -p model -p sample --message-format=json >target/gpu-tests.json

rm -rf "$G"
mkdir -p "$G/bin" "$G/scripts"
cp target/release/prefer "$G/bin/prefer"
[ "$have_bench" = 1 ] && cp target/release/examples/cuda_bench "$G/bin/cuda_bench"
# Integration tests named cuda_* of the engine and model crates → .gpu/bin/<crate>-<test>.
python3 - "$G/bin" <<'EOF'
import json, shutil, sys
dest = sys.argv[1]
found = []
for line in open("target/gpu-tests.json"):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("kind") == ["test"]
            and (t.get("name", "").startswith("cuda_") or t.get("name") == "gpu_generation")):
        # "path+file:///…/engine#0.1.0" or "path+file:///…/cli#prefer@0.1.0"
        pid = m["package_id"]
        frag = pid.split("#", 1)[1] if "#" in pid else ""
        crate = frag.split("@")[0] if "@" in frag else pid.split("#")[0].rstrip("/").split("/")[-1]
        name = f"{crate}-{t['name']}"
        shutil.copy(m["executable"], f"{dest}/{name}")
        found.append(name)
print("GPU test binaries:", ", ".join(found) or "none")
if not {"engine-cuda_parity", "model-cuda_parity"} <= set(found):
    sys.exit(f"missing GPU test binaries: found {found}")
EOF
command -v strip >/dev/null && strip "$G"/bin/* 2>/dev/null || true
cp "$shared/device/env.sh" "$shared/device/install-wheels.sh" "$G/"
cp bench/score_hf.py bench/gpu/*.py bench/gpu/with_smi.sh tools/make_random_model.py "$G/scripts/"
du -ah "$G" | sort -h | tail -n 12
size=$(du -sm "$G" | cut -f1)
if [ "$size" -gt 60 ]; then
    echo "error: $G is ${size} MiB, over the 60 MiB it may take of the 64 MiB a device call carries" >&2
    exit 1
fi
echo "ready: $G (${size} MiB). On the GPU machine, from the repository root: bash bench/gpu/run.sh"
