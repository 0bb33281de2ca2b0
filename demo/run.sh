#!/usr/bin/env bash
# The main job on the bundled tiny model (random weights, so its answers are noise) and demo
# data, in one command: `prefer run demo/pipeline.toml` samples a rejected answer per
# instruction with the reference workflow's Korean template and sampling settings, builds
# preference pairs (chosen = gold output, a validation split held out), trains a DPO LoRA
# adapter for a few steps with the reference workflow's settings scaled down, and merges it
# into the base as a plain model folder. Outputs land in demo-out/ (docs/run.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p prefer
prefer=target/release/prefer
out=demo-out
# A fresh start: a rerun on an existing demo-out/ would skip every finished stage.
rm -rf "$out"

"$prefer" run demo/pipeline.toml

echo
echo "samples:  $out/samples.jsonl"
echo "pairs:    $out/pairs (load with datasets.load_dataset(\"$out/pairs\"))"
echo "adapter:  $out/adapter (PeftModel.from_pretrained(base, \"$out/adapter\"))"
echo "merged:   $out/merged (AutoModelForCausalLM.from_pretrained(\"$out/merged\"))"
