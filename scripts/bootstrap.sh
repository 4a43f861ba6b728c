#!/usr/bin/env bash
# Prepare a Debian machine for ffworker development, tests and demos.
#
# Installs missing system packages (ffmpeg, PostgreSQL, Redis, RabbitMQ,
# python3-venv, chromium), starts PostgreSQL, Redis and RabbitMQ when they are not
# answering (RabbitMQ is the second supported broker; the chaos test runs on
# both), creates the
# database role and the `ffworker` database for the default
# FFWORKER_DATABASE_URL, builds .venv, installs the package with its test
# extras when setup.cfg changed, and runs the database migrations.
#
# Idempotent: a second run only checks and finishes within a few seconds.
# Works from any directory; uses sudo only when not run as root.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

DEFAULT_DATABASE_URL='postgresql+psycopg:///ffworker'
DATABASE_NAME='ffworker'
REDIS_HOST='127.0.0.1'
REDIS_PORT='6379'
RABBITMQ_PORT='5672'
VENV='.venv'
STAMP="$VENV/.ffworker-installed"
WAIT_SECONDS=30

step() { printf '==> %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not installed"
    SUDO=(sudo)
fi

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && sudo -u postgres -- "$@")
    fi
}

# ---------------------------------------------------------------- packages --
have_postgres_server() {
    command -v pg_ctlcluster >/dev/null 2>&1 &&
        command -v pg_isready >/dev/null 2>&1 &&
        compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

venv_usable() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1
}

missing=()
if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then
    missing+=(ffmpeg)
fi
if ! have_postgres_server; then
    missing+=(postgresql)
fi
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    missing+=(redis-server)
fi
# The dashboard's browser tests drive Debian's chromium at /usr/bin/chromium (Playwright
# cannot download a browser here, and another chromium on PATH, a snap say, is not that one).
if [ ! -x /usr/bin/chromium ]; then
    missing+=(chromium)
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    missing+=(rabbitmq-server)
fi
if ! venv_usable; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
    step "installing system packages: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    step "system packages already installed (ffmpeg, postgresql, redis-server, rabbitmq-server, chromium)"
fi

# -------------------------------------------------------------- PostgreSQL --
wait_for() {
    # wait_for DESCRIPTION COMMAND...: poll COMMAND for up to WAIT_SECONDS.
    local what=$1 i
    shift
    for ((i = 0; i < WAIT_SECONDS * 4; i++)); do
        if "$@"; then
            return 0
        fi
        sleep 0.25
    done
    die "$what did not come up within ${WAIT_SECONDS}s"
}

pg_ready() { pg_isready -q >/dev/null 2>&1; }

if pg_ready; then
    step "PostgreSQL already running"
else
    pg_version=$(find /etc/postgresql -mindepth 2 -maxdepth 2 -type d -name main 2>/dev/null |
        awk -F/ '{ print $(NF - 1) }' | sort -V | tail -n 1 || true)
    if [ -z "$pg_version" ]; then
        pg_version=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null |
            awk -F/ '{ print $(NF - 2) }' | sort -V | tail -n 1 || true)
        [ -n "$pg_version" ] || die "no PostgreSQL server found under /usr/lib/postgresql"
        step "creating PostgreSQL $pg_version cluster 'main'"
        "${SUDO[@]}" pg_createcluster "$pg_version" main
    fi
    step "starting PostgreSQL $pg_version"
    if ! "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start; then
        printf 'bootstrap: pg_ctlcluster start failed; waiting for the server anyway\n' >&2
    fi
    wait_for "PostgreSQL" pg_ready
fi

# ------------------------------------------------------------------- Redis --
redis_ready() {
    [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

if redis_ready; then
    step "Redis already running"
else
    if [ -d /var/log/redis ] && [ -w /var/log/redis ]; then
        redis_log=/var/log/redis/redis-server.log
    else
        redis_log=/tmp/ffworker-redis.log
    fi
    if [ -d /var/lib/redis ] && [ -w /var/lib/redis ]; then
        redis_dir=/var/lib/redis
    else
        redis_dir=/tmp
    fi
    step "starting Redis on $REDIS_HOST:$REDIS_PORT (log: $redis_log)"
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$redis_dir" --logfile "$redis_log"
    wait_for "Redis" redis_ready
fi

# ---------------------------------------------------------------- RabbitMQ --
rabbitmq_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$RABBITMQ_PORT") 2>/dev/null; }

if rabbitmq_ready; then
    step "RabbitMQ already running"
else
    # A container's hostname often does not resolve, and Erlang names its node after it:
    # pin the node to localhost and the listener to the loopback (guest may only log in there).
    if [ ! -s /etc/rabbitmq/rabbitmq-env.conf ] || ! grep -q '^NODENAME=' /etc/rabbitmq/rabbitmq-env.conf; then
        "${SUDO[@]}" mkdir -p /etc/rabbitmq
        printf '%s\n' 'NODENAME=rabbit@localhost' 'ERL_EPMD_ADDRESS=127.0.0.1' \
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"' |
            "${SUDO[@]}" tee -a /etc/rabbitmq/rabbitmq-env.conf >/dev/null
    fi
    if [ ! -s /etc/rabbitmq/rabbitmq.conf ]; then
        printf 'listeners.tcp.local = 127.0.0.1:%s\n' "$RABBITMQ_PORT" |
            "${SUDO[@]}" tee /etc/rabbitmq/rabbitmq.conf >/dev/null
    fi
    step "starting RabbitMQ on 127.0.0.1:$RABBITMQ_PORT"
    # The Debian wrapper switches to the rabbitmq user; -detached returns once the VM is up.
    "${SUDO[@]}" rabbitmq-server -detached >/dev/null 2>&1 ||
        printf 'bootstrap: rabbitmq-server -detached failed; waiting for the server anyway\n' >&2
    WAIT_SECONDS=60 wait_for "RabbitMQ" rabbitmq_ready
fi

# ------------------------------------------------------- role and database --
if [ -n "${FFWORKER_DATABASE_URL:-}" ] && [ "$FFWORKER_DATABASE_URL" != "$DEFAULT_DATABASE_URL" ]; then
    step "FFWORKER_DATABASE_URL is set; not creating a role or database"
else
    role=$(id -un)
    state=$(as_postgres psql -XAtq -v ON_ERROR_STOP=1 -v role="$role" -v db="$DATABASE_NAME" <<'SQL'
SELECT coalesce((SELECT rolsuper::text FROM pg_roles WHERE rolname = :'role'), 'missing')
       || ' ' ||
       (SELECT count(*) FROM pg_database WHERE datname = :'db');
SQL
    )
    read -r role_state db_count <<<"$state"
    case "$role_state" in
        true | t)
            step "PostgreSQL role '$role' already exists" ;;
        missing)
            step "creating PostgreSQL superuser role '$role'"
            as_postgres createuser -s "$role" ;;
        *)
            step "making PostgreSQL role '$role' a superuser"
            as_postgres psql -XAtq -v ON_ERROR_STOP=1 -v role="$role" <<'SQL'
ALTER ROLE :"role" SUPERUSER;
SQL
            ;;
    esac
    if [ "$db_count" = 0 ]; then
        step "creating database '$DATABASE_NAME'"
        as_postgres createdb -O "$role" "$DATABASE_NAME"
    else
        step "database '$DATABASE_NAME' already exists"
    fi
fi

# ---------------------------------------------------------- Python venv --
if ! venv_usable; then
    rm -rf "$VENV"
    step "creating $VENV"
    python3 -m venv "$VENV"
fi

wanted=$(sha256sum setup.cfg | cut -d' ' -f1)
installed=$(cat "$STAMP" 2>/dev/null || true)
if [ "$wanted" != "$installed" ]; then
    step "installing ffworker and its test extras into $VENV"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    printf '%s\n' "$wanted" >"$STAMP"
else
    step "Python packages already installed (setup.cfg unchanged)"
fi

# ------------------------------------------------------------ migrations --
mkdir -p var/media "${FFWORKER_MEDIA_ROOT:-var/media}"

step "running database migrations"
"$VENV/bin/python" manage.py db upgrade

step "ready"
