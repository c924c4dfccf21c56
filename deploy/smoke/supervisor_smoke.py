#!/usr/bin/env python3
"""Live test of deploy/supervisor/roomcast.conf under a private supervisord, on loopback.

    python3 deploy/smoke/supervisor_smoke.py --roomcast target/debug/roomcast   (as root)

The program section is the real file with only these replaced: the binary path, a loopback
--listen and a short --shutdown-delay appended to `command`, the log path, and `user`
(`nobody` instead of an account this machine may not have). supervisord gets its own
configuration file, socket and log in a temporary directory, with `minfds` set to what this
machine's hard limit allows.

Checks: supervisord starts roomcast as the unprivileged user with minfds as its open-file limit;
/healthz answers; `supervisorctl stop` sends SIGTERM, /readyz turns 503 during the shutdown
delay, roomcast exits 0 within stopwaitsecs and stays stopped; a crash (SIGKILL) is restarted
(autorestart=unexpected).

Needs root (supervisord switches user), Python's standard library, supervisord and the
roomcast binary. Every wait is bounded; everything started is stopped at the end.
"""

import argparse
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHUTDOWN_DELAY = 2.0
RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'}  {name}{('  (' + detail + ')') if detail else ''}", flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_until(predicate, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def replace_once(text, old, new):
    if text.count(old) != 1:
        raise SystemExit(f"roomcast.conf: expected exactly one {old!r}: the file changed shape")
    return text.replace(old, new)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roomcast", required=True, help="path of the roomcast binary")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: supervisord must switch to the program's user")
    binary = os.path.abspath(args.roomcast)
    tmp = tempfile.mkdtemp(prefix="roomcast-supervisor-smoke-")
    os.chmod(tmp, 0o755)
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    minfds = 1048576 if hard == resource.RLIM_INFINITY or hard >= 1048576 else hard

    program = open(os.path.join(DEPLOY, "supervisor", "roomcast.conf")).read()
    program = replace_once(
        program,
        "command=/usr/local/bin/roomcast serve --config /etc/roomcast/roomcast.toml",
        f"command={binary} serve --config {DEPLOY}/roomcast.toml --listen 127.0.0.1:{port} "
        f"--workers 1 --shutdown-delay {SHUTDOWN_DELAY}s",
    )
    program = replace_once(program, "user=roomcast", "user=nobody")
    program = replace_once(program, "stdout_logfile=/var/log/roomcast/roomcast.log", f"stdout_logfile={tmp}/roomcast.log")
    with open(os.path.join(tmp, "roomcast.conf"), "w") as f:
        f.write(program)
    sock = os.path.join(tmp, "supervisor.sock")
    main_conf = os.path.join(tmp, "supervisord.conf")
    with open(main_conf, "w") as f:
        f.write(
            f"[unix_http_server]\nfile={sock}\nchmod=0700\n\n"
            f"[supervisord]\nnodaemon=true\nlogfile={tmp}/supervisord.log\npidfile={tmp}/supervisord.pid\n"
            f"minfds={minfds}\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{sock}\n\n"
            f"[include]\nfiles={tmp}/roomcast.conf\n"
        )

    def ctl(*words):
        out = subprocess.run(["supervisorctl", "-c", main_conf, *words], capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def pid():
        text = ctl("pid", "roomcast")
        return int(text) if text.isdigit() and int(text) > 0 else None

    # Start supervisord with a soft limit of 1024, so that roomcast's limit shows minfds at work.
    supervisord = subprocess.Popen(
        ["supervisord", "-c", main_conf],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    try:
        if not check("supervisord starts roomcast, /healthz answers 200", wait_until(lambda: http_status(port, "/healthz") == 200, 15)):
            return
        first = pid()
        status = open(f"/proc/{first}/status").read()
        uid = int(next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1])
        check("roomcast runs as the configured unprivileged user", uid == pwd.getpwnam("nobody").pw_uid, f"uid {uid}")
        limits = open(f"/proc/{first}/limits").read()
        line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
        check("roomcast inherits supervisord's minfds as its open-file limit", line.split()[3] == str(minfds), f"soft/hard {' '.join(line.split()[3:5])}; supervisord started with soft 1024, minfds={minfds}")

        # Crash: restarted (autorestart=unexpected).
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: (lambda p: p if p and p != first else None)(pid()), 15)
        check("a crash (SIGKILL) is restarted", second and wait_until(lambda: http_status(port, "/healthz") == 200, 10), f"pid {first} -> {second}")

        # Graceful stop: SIGTERM, readyz 503 during the delay, exit 0, stays stopped.
        t0 = time.monotonic()
        stopper = subprocess.Popen(["supervisorctl", "-c", main_conf, "stop", "roomcast"], stdout=subprocess.PIPE, text=True)
        check("during the stop, /readyz answers 503 while roomcast still serves", wait_until(lambda: http_status(port, "/readyz") == 503, SHUTDOWN_DELAY))
        out, _ = stopper.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        check("supervisorctl stop waits for the drain and succeeds", "stopped" in out, f"{out.strip()!r} after {elapsed:.1f}s")
        log = open(f"{tmp}/supervisord.log").read()
        check("roomcast exited 0 on SIGTERM (not killed)", "stopped: roomcast (exit status 0)" in log and "SIGKILL" not in log.split("waiting for roomcast to stop")[-1])
        time.sleep(2)
        check("it stays stopped (no restart after a clean exit)", "STOPPED" in ctl("status", "roomcast"))
    finally:
        if supervisord.poll() is None:
            supervisord.send_signal(signal.SIGTERM)
            try:
                supervisord.wait(timeout=30)
            except subprocess.TimeoutExpired:
                supervisord.kill()
                supervisord.wait()
        failed = sum(1 for _, ok in RESULTS if not ok)
        if failed:
            print(f"logs kept in {tmp}")
            for name in ("supervisord.log", "roomcast.log"):
                path = os.path.join(tmp, name)
                if os.path.exists(path):
                    print(f"--- {name} (last lines)")
                    print("".join(open(path).readlines()[-15:]), end="")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"supervisor: {len(RESULTS) - failed} passed, {failed} failed")
        sys.exit(1 if failed or not RESULTS else 0)


if __name__ == "__main__":
    main()
