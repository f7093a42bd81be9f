#!/usr/bin/env bash
# dev-cluster.sh — a real two-node SLURM cluster on this one machine, for developing
# and testing sept's submitit/DDP launch path (tests/test_slurm_cluster.py).
#
# Usage (as root):
#   bash slurm/dev-cluster.sh up       # install if needed, configure, start, wait until both nodes are idle
#   bash slurm/dev-cluster.sh down     # stop both slurmd and slurmctld (munged is left running)
#   bash slurm/dev-cluster.sh status   # print sinfo
#
# What it owns (and overwrites):
#   /etc/slurm/slurm.conf              rendered from slurm/slurm.conf.in (cluster "sept-dev")
#   /etc/munge/munge.key               created only if missing
#   /etc/hosts                         adds "127.0.0.1 node1 node2" once, if those names are missing
#   /var/spool/slurmctld, /var/spool/slurmd/node{1,2}, /var/log/slurm/*, /run/slurm*.pid
# Daemons: munged (as user munge), slurmctld on 127.0.0.1:16817, and two slurmd,
# `slurmd -N node1` on 127.0.0.1:17001 and `slurmd -N node2` on 127.0.0.1:17002.
# There is no systemd here: daemons are started directly and tracked by pid file.
#
# `up` is idempotent: it starts only what is not running, and restarts the SLURM
# daemons only when the rendered slurm.conf differs from the one they run with.
set -euo pipefail

readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly TEMPLATE="$SCRIPT_DIR/slurm.conf.in"
readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly MUNGE_KEY=/etc/munge/munge.key
readonly NODES=(node1 node2)
readonly SLURMCTLD_PORT=16817
readonly NODE1_PORT=17001
readonly NODE2_PORT=17002
# Modest on purpose: both nodes share this machine's memory.
readonly REAL_MEMORY_MB=2048
readonly UP_TIMEOUT_S=60
readonly PACKAGES=(munge slurmctld slurmd slurm-client)

log() { echo "dev-cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() {
    [[ $EUID -eq 0 ]] || die "must run as root (it writes /etc/slurm, /etc/hosts and starts daemons)"
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        # Wait up to 10 minutes for another process's apt or dpkg lock instead of failing.
        apt-get -o DPkg::Lock::Timeout=600 update
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}"
    fi
}

# --- munge --------------------------------------------------------------------

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    # munged refuses keys and dirs that are not owned by the user it runs as.
    chown munge:munge "$MUNGE_KEY" /etc/munge
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 /etc/munge
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if munge_works; then
        return
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    local i
    for ((i = 0; i < 50; i++)); do
        munge_works && return
        sleep 0.2
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

# --- hosts and config -----------------------------------------------------------

ensure_hosts() {
    # Node names must resolve: submitit/torch use the first node's name as MASTER_ADDR.
    local name unresolved=()
    for name in "${NODES[@]}"; do
        grep -Eq "^127\.0\.0\.1([[:space:]].*)?[[:space:]]$name([[:space:]]|\$)" /etc/hosts || unresolved+=("$name")
    done
    if ((${#unresolved[@]})); then
        log "adding ${unresolved[*]} to /etc/hosts"
        echo "127.0.0.1 ${unresolved[*]}" >>/etc/hosts
    fi
}

node_hardware() {
    # Boards/sockets/cores/threads exactly as slurmd detects them, so slurmd never
    # drains a node for reporting less than configured. Both nodes claim the same cores.
    local detected
    detected=$(slurmd -C | head -n 1)
    grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' <<<"$detected" | tr '\n' ' ' | sed 's/ $//'
}

render_conf() {
    sed -e "s/@SLURMCTLD_PORT@/$SLURMCTLD_PORT/" \
        -e "s/@NODE1_PORT@/$NODE1_PORT/" \
        -e "s/@NODE2_PORT@/$NODE2_PORT/" \
        -e "s/@NODE_HARDWARE@/$(node_hardware)/" \
        -e "s/@REAL_MEMORY_MB@/$REAL_MEMORY_MB/" \
        "$TEMPLATE"
}

# Writes slurm.conf atomically; returns 0 if its content changed, 1 if not.
write_conf() {
    local rendered
    rendered=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    render_conf >"$rendered"
    chmod 0644 "$rendered"
    if [[ -f $SLURM_CONF ]] && cmp -s "$rendered" "$SLURM_CONF"; then
        rm -f "$rendered"
        return 1
    fi
    log "writing $SLURM_CONF"
    mv "$rendered" "$SLURM_CONF"
    return 0
}

# --- slurm daemons --------------------------------------------------------------

slurmctld_pidfile() { echo /run/slurmctld.pid; }
slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }

# Alive = exists and is not a zombie (a killed daemon can linger unreaped for a while).
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

# Running = the pid file names a live process with the expected program name.
pid_running() {
    local pidfile=$1 comm=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    pid_alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

stop_pid() {
    local pidfile=$1 comm=$2 what=$3 pid i
    if ! pid_running "$pidfile" "$comm"; then
        rm -f "$pidfile"
        return
    fi
    pid=$(<"$pidfile")
    log "stopping $what (pid $pid)"
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || break
        sleep 0.2
    done
    if pid_alive "$pid"; then
        log "$what did not exit after 20 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

# When this run started each slurmd (ISO time), to tell its registration from a stale one.
declare -A SLURMD_STARTED_AT=()

start_slurm() {
    mkdir -p /var/spool/slurmctld /var/log/slurm
    if ! pid_running "$(slurmctld_pidfile)" slurmctld; then
        log "starting slurmctld"
        slurmctld || die "slurmctld failed to start; see /var/log/slurm/slurmctld.log"
    fi
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "/var/spool/slurmd/$node"
        if ! pid_running "$(slurmd_pidfile "$node")" slurmd; then
            log "starting slurmd -N $node"
            SLURMD_STARTED_AT[$node]=$(date +%Y-%m-%dT%H:%M:%S)
            slurmd -N "$node" || die "slurmd -N $node failed to start; see /var/log/slurm/slurmd-$node.log"
        fi
    done
}

# A restarted slurmctld reports nodes as idle from its saved state before their slurmd
# has registered; a node only counts once its SlurmdStartTime is this run's slurmd.
slurmd_registered() {
    local node=$1 registered_at
    registered_at=$(scontrol show node "$node" -o 2>/dev/null | grep -oE 'SlurmdStartTime=[^ ]+' | cut -d= -f2)
    [[ -n $registered_at && $registered_at != None && ! $registered_at < ${SLURMD_STARTED_AT[$node]:-} ]]
}

stop_slurm() {
    local node
    for node in "${NODES[@]}"; do
        stop_pid "$(slurmd_pidfile "$node")" slurmd "slurmd $node"
    done
    stop_pid "$(slurmctld_pidfile)" slurmctld slurmctld
}

# Prints "node state" lines, e.g. "node1 idle"; empty if slurmctld does not answer.
node_states() { sinfo --noheader --Node --format='%N %t' 2>/dev/null | sort -u || true; }

wait_until_idle() {
    local deadline=$((SECONDS + UP_TIMEOUT_S)) states node ready resumed=0
    while :; do
        states=$(node_states)
        ready=0
        for node in "${NODES[@]}"; do
            # idle is the goal; mix/alloc/comp mean it is up and already running jobs.
            grep -Eq "^$node (idle|mix|alloc|comp)\$" <<<"$states" && slurmd_registered "$node" && ready=$((ready + 1))
        done
        ((ready == ${#NODES[@]})) && return 0
        # A node left DOWN/DRAIN by an earlier run (e.g. killed slurmd) needs a resume
        # once its slurmd answers again (no '*' suffix = responding).
        if ((!resumed)) && grep -Eq "^($(IFS='|'; echo "${NODES[*]}")) (down|drain|drng|fail)\$" <<<"$states"; then
            log "resuming nodes left down/drained: $(tr '\n' ' ' <<<"$states")"
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME 2>/dev/null || true
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            die "nodes not idle after ${UP_TIMEOUT_S}s; sinfo says: ${states:-<no answer from slurmctld>}; see /var/log/slurm/"
        fi
        sleep 1
    done
}

one_line_status() {
    local states
    states=$(node_states | tr '\n' ' ' | sed 's/ $//')
    echo "sept-dev: slurmctld 127.0.0.1:$SLURMCTLD_PORT; partition debug; ${states:-slurmctld not answering}"
}

# --- commands -------------------------------------------------------------------

cmd_up() {
    require_root
    install_packages
    start_munge
    ensure_hosts
    if write_conf; then
        # Daemons that run with an older config would disagree with it; restart them.
        stop_slurm
    fi
    start_slurm
    wait_until_idle
    one_line_status
}

cmd_down() {
    require_root
    stop_slurm
    log "stopped (munged left running)"
}

cmd_status() {
    sinfo
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
