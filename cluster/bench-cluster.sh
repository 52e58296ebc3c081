# Sourced by the benchmark scripts: start_bench_cluster PORT starts three colony servers on
# 127.0.0.1:PORT..PORT+2 in a temporary directory, as every cluster runs (TLS from its own CA,
# ACLs bootstrapped, servers joining with a server token), waits until all three are voters,
# exports $COLONY_TOKEN (the management token) and sets $endpoints; it stops them and removes the
# directory when the script exits. Needs $colony (the binary). $COLONY_SERVER_ARGS, if set, is added
# to every server's flags (to compare settings, e.g. "--heartbeat-ms 30").
start_bench_cluster() {
    local port="$1"
    dir="$(mktemp -d /tmp/colony-bench.XXXXXX)"
    pids=()
    trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
    "$colony" server --id 1 --data-dir "$dir/d1" --listen "127.0.0.1:$port" --bootstrap ${COLONY_SERVER_ARGS:-} >"$dir/s1.log" 2>&1 &
    pids+=($!)
    local server_token=""
    # A build from before TLS and ACLs (cluster/bench-compare.sh may run one) joins without them.
    if "$colony" acl --help >/dev/null 2>&1; then
        for _ in $(seq 1 100); do
            [ -s "$dir/d1/tls/ca.pem" ] && break
            sleep 0.1
        done
        bootstrap_bench_acl "$port" || return 1
    fi
    for i in 2 3; do
        "$colony" server --id "$i" --data-dir "$dir/d$i" --listen "127.0.0.1:$((port + i - 1))" --join "127.0.0.1:$port" ${server_token:+--token "$server_token"} ${COLONY_SERVER_ARGS:-} >"$dir/s$i.log" 2>&1 &
        pids+=($!)
    done
    endpoints="127.0.0.1:$port,127.0.0.1:$((port + 1)),127.0.0.1:$((port + 2))"
    local voters
    for _ in $(seq 1 100); do
        voters=$("$colony" --endpoint "$endpoints" --timeout 1s cluster status --output json 2>/dev/null | grep -c '"voter"' || true)
        [ "$voters" = 3 ] && return 0
        sleep 0.2
    done
    echo "the benchmark cluster did not form; logs in $dir" >&2
    return 1
}

# Bootstraps ACLs through the first server (trusting the CA in its data directory), exports the
# management token as COLONY_TOKEN and sets $server_token for the servers that join.
bootstrap_bench_acl() {
    local port="$1"
    COLONY_TOKEN=$("$colony" --endpoint "127.0.0.1:$port" --timeout 20s acl bootstrap --ca-file "$dir/d1/tls/ca.pem" 2>/dev/null) || {
        echo "cannot bootstrap ACLs on the benchmark cluster; logs in $dir" >&2
        return 1
    }
    export COLONY_TOKEN
    server_token=$("$colony" --endpoint "127.0.0.1:$port" --timeout 20s cluster token create --kind server --ttl 10m 2>/dev/null)
}
