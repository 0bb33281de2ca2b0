#!/usr/bin/env bash
# with_smi.sh FILE CMD...: runs CMD while nvidia-smi samples the GPU's used memory (MiB) every
# 100 ms into FILE (one number a line; the first line is read before CMD starts). Exits with
# CMD's status. Used by bench/gpu/run.sh for a driver-side peak that both prefer and
# transformers are measured by alike.
f=$1
shift
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$f" 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >> "$f" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
"$@"
rc=$?
kill $sampler 2>/dev/null
wait $sampler 2>/dev/null
exit $rc
