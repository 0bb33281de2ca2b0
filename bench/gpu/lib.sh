# bench/gpu/lib.sh — what the GPU-machine scripts (gen.sh, run.sh) share: a time budget and
# bounded, logged steps. Sourced, not run. The sourcing script sets, before calling these:
#   START       the run's start (date +%s)
#   BUDGET      seconds the whole run may take
#   W           the work folder: step logs go to $W/logs/, step statuses to $W/steps.jsonl
#   RESERVE_S   with this few seconds of the budget left, no step starts and no wait goes on
#   TAIL_LINES  how many lines of a step's log to echo when it ends
# shellcheck shell=bash

elapsed() { echo $(($(date +%s) - START)); }
remaining() { echo $((BUDGET - $(elapsed))); }

# step NAME LIMIT_S CMD...: runs CMD under a timeout (capped by the time left), its output in
# $W/logs/NAME.log (tail echoed here), its status in $W/steps.jsonl. Returns CMD's status
# (99: skipped, the budget being spent).
step() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if ((left < RESERVE_S)); then
        echo "== SKIP $name: ${left}s of the budget left"
        echo "{\"step\": \"$name\", \"status\": \"skipped\"}" >>"$W/steps.jsonl"
        return 99
    fi
    ((limit > left)) && limit=$left
    echo "== STEP $name at +$(elapsed)s (limit ${limit}s)"
    echo "+ $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 5 "$limit" "$@" >"$W/logs/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n "$TAIL_LINES" "$W/logs/$name.log"
    local secs
    secs=$(awk "BEGIN {print $t1 - $t0}")
    echo "== END $name rc=$rc (${secs}s)$( ((rc == 124 || rc == 137)) && echo ' TIMED OUT')"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs}" >>"$W/steps.jsonl"
    return $rc
}

# wait_for FILE PID: waits (within the budget) for FILE, which background job PID (writing the
# random models) is to make; says so when it does not come.
wait_for() {
    while [ ! -e "$1" ] && (($(remaining) > RESERVE_S)) && kill -0 "$2" 2>/dev/null; do
        sleep 1
    done
    [ -e "$1" ] || echo "== MISSING $1 (see logs/make-models.log)"
    [ -e "$1" ]
}
