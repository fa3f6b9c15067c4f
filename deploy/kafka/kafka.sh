#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft, broker+controller) on 127.0.0.1, from the jars
# pinned in deploy/kafka/pom.xml. No Docker, nothing downloaded but Maven Central.
#
#   kafka.sh fetch                         copy the jars into the cache (idempotent)
#   kafka.sh start [--dir D] [--port P] [--watch-pid PID]
#                                          format storage, start, wait until it answers
#                                          metadata requests; prints the bootstrap address
#   kafka.sh stop [--dir D]                stop cleanly (SIGTERM, then SIGKILL at the deadline)
#   kafka.sh status [--dir D]              print the bootstrap address if running
#   kafka.sh classpath                     print the classpath (for the perf tools)
#
# Environment: CDRANON_CACHE (default ~/.cache/cdranon) holds the jars, outside the work
# tree; CDRANON_KAFKA_START_TIMEOUT (default 90 s); KAFKA_HEAP (default 768m).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/pom.xml")"
CACHE="${CDRANON_CACHE:-$HOME/.cache/cdranon}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
DEFAULT_DIR="$CACHE/run/kafka"
START_TIMEOUT="${CDRANON_KAFKA_START_TIMEOUT:-90}"

die() { echo "kafka.sh: $*" >&2; exit 1; }

fetch() {
    if [[ -f "$LIBS/.complete" ]]; then return 0; fi
    command -v java >/dev/null || die "java not found: install OpenJDK 17+ (apt-get install openjdk-17-jre-headless)"
    command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install maven)"
    echo "kafka.sh: fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIBS" >&2
    rm -rf "$LIBS.tmp"
    mkdir -p "$LIBS.tmp"
    mvn -q -B -f "$HERE/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$LIBS.tmp" -DincludeScope=runtime >&2 \
        || die "maven could not fetch the Kafka jars (see above)"
    rm -rf "$LIBS"
    mv "$LIBS.tmp" "$LIBS"
    touch "$LIBS/.complete"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

is_running() { [[ -f "$1/pid" ]] && kill -0 "$(cat "$1/pid")" 2>/dev/null; }

start() {
    local dir="$DEFAULT_DIR" port="" watch_pid=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dir) dir="$2"; shift 2 ;;
            --port) port="$2"; shift 2 ;;
            --watch-pid) watch_pid="$2"; shift 2 ;;
            *) die "start: unknown option $1" ;;
        esac
    done
    fetch
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if is_running "$dir"; then cat "$dir/bootstrap"; return 0; fi
    [[ -n "$port" ]] || port="$(free_port)"
    local cport; cport="$(free_port)"
    rm -rf "$dir/data"
    mkdir -p "$dir/data"
    cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# The retention controller deletes month topics; the tests exercise that.
delete.topic.enable=true
# On one node, Kafka's transaction coordinator drops the markers of a commit it is
# completing when the partitions lose their leader, and records the commit complete: the
# next transaction of that producer then aborts or exposes those records (a Kafka bug,
# docs/reliability.md, scenario 2). Two things leave every partition leaderless here, so
# both are off: a controlled shutdown (SIGTERM), and the controller fencing its own broker
# when its heartbeat is older than the session (9 s by default), e.g. after the process
# was stopped (SIGSTOP, a laptop's sleep) and resumed. (Off is safe only because this
# script formats fresh storage on every start: a broker restarted on its data without a
# controlled shutdown registers again only once the old session expired, and is fenced
# in between.)
controlled.shutdown.enable=false
broker.session.timeout.ms=600000
PROPS
    cat >"$dir/log4j2.yaml" <<LOG
Configuration:
  Appenders:
    File:
      name: F
      fileName: $dir/server.log
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: F
LOG
    local cp="$LIBS/*"
    local cluster_id
    cluster_id="$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null)"
    java -Dlog4j2.configurationFile="$dir/log4j2.yaml" -cp "$cp" kafka.tools.StorageTool \
        format -t "$cluster_id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
        || { cat "$dir/format.log" >&2; die "formatting KRaft storage failed"; }
    : >"$dir/server.log"
    # setsid: the broker gets its own process group, so stop can end it and its children.
    setsid java -Xms256m -Xmx"${KAFKA_HEAP:-768m}" -XX:+UseG1GC \
        -Dlog4j2.configurationFile="$dir/log4j2.yaml" \
        -cp "$cp" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$dir/pid"
    echo "127.0.0.1:$port" >"$dir/bootstrap"
    if [[ -n "$watch_pid" ]]; then
        # If whoever started us dies (even by SIGKILL), take the broker down with it.
        ( trap '' HUP; while kill -0 "$watch_pid" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
          kill -TERM "$pid" 2>/dev/null; sleep 10; kill -KILL "$pid" 2>/dev/null ) >/dev/null 2>&1 </dev/null &
        disown
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    while (( SECONDS < deadline )); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "---- broker log tail ($dir) ----" >&2
            tail -n 40 "$dir/server.log" "$dir/stdout.log" >&2 || true
            rm -f "$dir/pid"
            die "the broker exited during start-up"
        fi
        if port_open "$port" && grep -q "Kafka Server started" "$dir/server.log" 2>/dev/null; then
            # A metadata request through the real client tool: the broker answers, not just listens.
            if timeout 30 java -cp "$cp" org.apache.kafka.tools.TopicCommand \
                --bootstrap-server "127.0.0.1:$port" --list >"$dir/probe.log" 2>&1; then
                echo "127.0.0.1:$port"
                return 0
            fi
        fi
        sleep 0.5
    done
    echo "---- broker log tail ($dir) ----" >&2
    tail -n 40 "$dir/server.log" "$dir/stdout.log" "$dir/probe.log" >&2 || true
    stop --dir "$dir" >/dev/null 2>&1 || true
    die "the broker did not answer metadata requests within ${START_TIMEOUT}s"
}

stop() {
    local dir="$DEFAULT_DIR"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dir) dir="$2"; shift 2 ;;
            *) die "stop: unknown option $1" ;;
        esac
    done
    [[ -f "$dir/pid" ]] || return 0
    local pid; pid="$(cat "$dir/pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "kafka.sh: broker $pid did not stop in 30s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$dir/pid"
}

status() {
    local dir="$DEFAULT_DIR"
    [[ "${1:-}" == "--dir" ]] && dir="$2"
    if is_running "$dir"; then cat "$dir/bootstrap"; else echo "not running" >&2; return 1; fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
    fetch) fetch ;;
    start) start "$@" ;;
    stop) stop "$@" ;;
    status) status "$@" ;;
    classpath) fetch; echo "$LIBS/*" ;;
    *) die "usage: kafka.sh fetch|start|stop|status|classpath [--dir D] [--port P] [--watch-pid PID]" ;;
esac
