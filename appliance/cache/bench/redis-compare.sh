#!/usr/bin/env bash
# Compare the appliance cache's RESP endpoint with redis-server using
# redis-benchmark (issue 5). Not a test: it prints a table.
#
# Needs the Debian packages redis-server and redis-tools
# (apt-get install redis-server redis-tools). Everything runs on loopback;
# both servers are started here and stopped on exit.
#
# Rows: GET and SET, 50 clients, pipeline 1 and 16, values of 256 B and
# 16 KiB, in memory mode (redis: no persistence; ours: no log) and durable
# mode (redis: appendonly yes + appendfsync always; ours: --fsync always).
#
# Environment: REQUESTS (default 100000; pipelined rows use 4x),
# DURABLE_REQUESTS (default 20000), KEYSPACE (default 10000), ROUNDS
# (default 3). Each row is measured ROUNDS times, alternating redis and ours
# (and which of them goes first) so that load from elsewhere on the machine
# hits both alike; the table shows
# the median throughput and the median p99 of the rounds, and the lowest
# and highest p99 of each side's rounds (on a disk whose fdatasync stalls
# now and then, a durable round's p99 is that of the stall it caught), and
# a round-by-round comparison (see `paired`) that tells a row where one
# server is ahead apart from a tie that noise decides. MODES, SIZES,
# PIPELINES and TESTS (defaults "memory durable", "256 16384", "1 16",
# "set get") pick rows; OURS_ARGS adds arguments to our server.
#
# CONTROL=redis runs a second redis-server, configured like the first, in
# place of ours: an A/A run. Every difference it shows between two copies
# of one program is this machine's noise, so it tells how often the
# target verdict (ours >= redis at the median, in throughput and in p99)
# misses when nothing differs.
#
# CPUs: on a machine with at least two, redis-benchmark runs on CPU
# CLIENT_CPUS (default 0) and both servers on SERVER_CPUS (default 1), so
# that the scheduler never puts the client and the server it measures on
# one core for part of a run (unpinned on this 2-core box, one row's rounds
# ranged 58k-110k SETs/s; pinned, 101k-113k). PIN=0 turns this off.
# The "cpu %" column is the share of one core that redis-benchmark used
# during each side's runs, then the share the server measured used (user +
# system time over the run's wall time, medians). At 95 % or more for the
# client, the client sets the pace ("client-bound" in the table), and such
# a row compares the two servers only as far as their difference shows
# through a saturated client. The server's share tells whether the
# server's core is near its limit too (on this kind of 2-core machine it
# is, in the one-request-at-a-time rows: the kernel's loopback TCP work
# for each reply is charged to the server).
set -euo pipefail

REQUESTS=${REQUESTS:-100000}
DURABLE_REQUESTS=${DURABLE_REQUESTS:-20000}
KEYSPACE=${KEYSPACE:-10000}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-memory durable}
SIZES=${SIZES:-256 16384}
PIPELINES=${PIPELINES:-1 16}
TESTS=${TESTS:-set get}
read -r -a ours_args <<<"${OURS_ARGS:-}"
REDIS_PORT=${REDIS_PORT:-16379}
OURS_PORT=${OURS_PORT:-16380}
client_pin=() server_pin=()
if [[ ${PIN:-1} != 0 ]] && (($(nproc) >= 2)) && command -v taskset >/dev/null; then
    client_pin=(taskset -c "${CLIENT_CPUS:-0}")
    server_pin=(taskset -c "${SERVER_CPUS:-1}")
fi

for tool in redis-server redis-benchmark redis-cli; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install redis-server redis-tools" >&2; exit 2; }
done

root=$(cd "$(dirname "$0")/../../.." && pwd)
cargo build --release -q -p appliance-cache --bin appliance-cache-server --manifest-path "$root/Cargo.toml"
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
ours_bin="$target_dir/release/appliance-cache-server"

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        redis-cli -p "$1" PING >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server on port $1 did not come up" >&2
    exit 1
}

start_servers() { # mode
    local mode=$1
    mkdir -p "$work/$mode/redis" "$work/$mode/ours"
    local aof=no
    [[ $mode == durable ]] && aof=yes
    "${server_pin[@]}" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$work/$mode/redis" --save '' \
        --appendonly "$aof" --appendfsync always --daemonize no --logfile "$work/redis.log" &
    pids+=($!)
    if [[ ${CONTROL:-} == redis ]]; then
        "${server_pin[@]}" redis-server --bind 127.0.0.1 --port "$OURS_PORT" --dir "$work/$mode/ours" --save '' \
            --appendonly "$aof" --appendfsync always --daemonize no --logfile "$work/ours.log" &
    elif [[ $mode == durable ]]; then
        "${server_pin[@]}" "$ours_bin" --listen "127.0.0.1:$OURS_PORT" --dir "$work/$mode/ours" --fsync always "${ours_args[@]}" \
            >"$work/ours.log" 2>&1 &
    else
        "${server_pin[@]}" "$ours_bin" --listen "127.0.0.1:$OURS_PORT" "${ours_args[@]}" >"$work/ours.log" 2>&1 &
    fi
    pids+=($!)
    # (taskset execs the server, so these are the servers' own pids.)
    redis_pid=${pids[0]} ours_pid=${pids[1]}
    wait_port "$REDIS_PORT"
    wait_port "$OURS_PORT"
}

stop_servers() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}

# Durable mode: before each run, wait until neither server is doing
# background work on its log files (redis: an AOF rewrite; ours: a
# compaction, reported under the same INFO field, or writing a spare
# segment, `log_spare_in_progress`), so that one server's background work
# from its previous run does not land in the other's measurement. Both
# check for due work every 100 ms, hence the short wait first. At most 30 s.
settle() {
    [[ $mode == durable ]] || return 0
    sleep 0.3
    for _ in $(seq 300); do
        local busy=0
        for port in "$REDIS_PORT" "$OURS_PORT"; do
            if [[ $(redis-cli -p "$port" INFO persistence | tr -d '\r' |
                awk -F: '/^(aof_rewrite_(in_progress|scheduled)|log_spare_in_progress):/ { n += $2 } END { print n + 0 }') != 0 ]]; then
                busy=1
            fi
        done
        [[ $busy == 0 ]] && return 0
        sleep 0.1
    done
    echo "warning: a server was still rewriting its log after 30 s; measuring anyway" >&2
}

# One redis-benchmark run; prints "rps p99_ms client_cpu server_cpu" (each
# process's user + system time over the run's wall time: 1.0 is one busy
# core).
run() { # port server_pid test pipeline size requests
    settle
    python3 - "$2" "${client_pin[@]}" redis-benchmark -h 127.0.0.1 -p "$1" -c 50 -n "$6" -P "$4" -d "$5" \
        -r "$KEYSPACE" -t "$3" --csv -q <<'PY'
import csv, os, resource, subprocess, sys, time
def server_cpu(pid):
    # utime and stime, fields 14 and 15, after the parenthesised name.
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
server = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_CHILDREN)
server_before = server_cpu(server)
start = time.monotonic()
out = subprocess.run(sys.argv[2:], capture_output=True, text=True, check=True).stdout
wall = time.monotonic() - start
server_after = server_cpu(server)
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
rows = [r for r in csv.reader(out.splitlines()) if r and r[0] != "test"]
print(rows[-1][1], rows[-1][6], f"{cpu / wall:.3f}", f"{(server_after - server_before) / wall:.3f}")
PY
}

# Median throughput, median p99, the lowest and highest p99 of the rounds
# ("lo-hi"), median client CPU and median server CPU of "rps p99 cpu cpu"
# lines.
median() {
    printf '%s\n' "$@" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
p99 = [r[1] for r in rows]
print(f"{statistics.median(r[0] for r in rows):.2f}", f"{statistics.median(p99):.3f}",
      f"{min(p99):.2f}-{max(p99):.2f}", f"{100 * statistics.median(r[2] for r in rows):.0f}",
      f"{100 * statistics.median(r[3] for r in rows):.0f}")'
}

# Round by round: each round's two runs ran one right after the other, so
# their ratio (ours / redis) cancels the machine's slow and fast phases,
# which the medians of each side do not. Prints, for throughput and for
# p99, the distribution-free confidence interval of the median of those
# ratios (order statistics: the sign test's interval; at least 90 % from 5
# rounds on, 75 % with 3) and
# what it shows: ours higher, lower, or "tie" when the interval holds 1.0.
# With 5 rounds the interval is the lowest to highest ratio, so one
# round that goes the other way makes a tie; with 8 it drops one round
# at each end.
paired() { # "redis runs" "ours runs", one "rps p99 cpu cpu" per line, same order
    python3 -c '
import math, sys
r = [tuple(map(float, l.split())) for l in sys.argv[1].splitlines() if l.strip()]
o = [tuple(map(float, l.split())) for l in sys.argv[2].splitlines() if l.strip()]
n = len(r)
k = 1  # largest k with P(X < k) <= 5 %, X ~ Binomial(n, 1/2)
while k < n and sum(math.comb(n, i) for i in range(k + 1)) / 2**n <= 0.05:
    k += 1
def interval(ratios, up, down):
    x = sorted(ratios)
    lo, hi = x[k - 1], x[n - k]
    word = up if lo > 1 else down if hi < 1 else "tie"
    return f"{lo:.2f}-{hi:.2f} {word}"
print(interval([b[0] / a[0] for a, b in zip(r, o)], "more", "LESS") + ",",
      interval([b[1] / a[1] for a, b in zip(r, o)], "HIGHER", "lower"))' "$1" "$2"
}

case ${CONTROL:-} in
'') ;;
redis) echo "CONTROL=redis: the \"ours\" columns are a second redis-server (an A/A run)" ;;
*) echo "CONTROL must be redis or unset" >&2; exit 2 ;;
esac
printf '%-8s %-4s %3s %6s | %12s %9s | %12s %9s | %6s %-7s | %-29s | %-31s | %s\n' \
    mode test P size "redis rps" "p99 ms" "ours rps" "p99 ms" ratio verdict "cpu %: client r/o, server r/o" "p99 of the rounds, redis / ours" \
    "round by round, ours/redis: rps, p99"
for mode in $MODES; do
    start_servers "$mode"
    for size in $SIZES; do
        for p in $PIPELINES; do
            for t in $TESTS; do
                n=$REQUESTS
                [[ $p == 16 ]] && n=$((REQUESTS * 4))
                [[ $mode == durable ]] && n=$DURABLE_REQUESTS
                r_runs=() o_runs=()
                for round in $(seq "$ROUNDS"); do
                    # Who goes first alternates, so that neither is always
                    # the one measured right after the other's run.
                    if ((round % 2)); then
                        r_runs+=("$(run "$REDIS_PORT" "$redis_pid" "$t" "$p" "$size" "$n")")
                        o_runs+=("$(run "$OURS_PORT" "$ours_pid" "$t" "$p" "$size" "$n")")
                    else
                        o_runs+=("$(run "$OURS_PORT" "$ours_pid" "$t" "$p" "$size" "$n")")
                        r_runs+=("$(run "$REDIS_PORT" "$redis_pid" "$t" "$p" "$size" "$n")")
                    fi
                done
                read -r r_rps r_p99 r_spread r_cpu r_server < <(median "${r_runs[@]}")
                read -r o_rps o_p99 o_spread o_cpu o_server < <(median "${o_runs[@]}")
                bound=""
                ((r_cpu >= 95 && o_cpu >= 95)) && bound=" client-bound"
                verdict=$(python3 -c "
r, o, rp, op = $r_rps, $o_rps, $r_p99, $o_p99
ok = o >= r and op <= rp
print(f'{o / r:.2f} ' + ('ok' if ok else 'MISS'))")
                read -r ratio ok <<<"$verdict"
                printf '%-8s %-4s %3s %6s | %12s %9s | %12s %9s | %6s %-7s | %-29s | %-31s | %s\n' \
                    "$mode" "$t" "$p" "$size" "$r_rps" "$r_p99" "$o_rps" "$o_p99" "$ratio" "$ok" \
                    "$r_cpu / $o_cpu, $r_server / $o_server$bound" "$r_spread / $o_spread" \
                    "$(paired "$(printf '%s\n' "${r_runs[@]}")" "$(printf '%s\n' "${o_runs[@]}")")"
            done
        done
    done
    stop_servers
done
