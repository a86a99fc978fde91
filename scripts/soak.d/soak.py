#!/usr/bin/env python3
"""The soak of beamline-router: steady gRPC Decide load with a fault every minute.

Started by scripts/soak (which checks the tools, builds the binary and provides a
Python with grpcio); run it directly with --help for the options.

What it does, all on 127.0.0.1 and on free ports:
  1. starts its own nats-server and `beamline-router serve --demo` (fixtures source,
     no database), and waits until the router is ready;
  2. sends Decide requests over gRPC at a steady rate (open loop: the schedule does not
     slow down when the router does) for --minutes minutes, each request carrying a
     deadline; a mix of normal requests, PII (blocked by pii_guard), unknown policies,
     invalid requests and dry runs;
  3. injects one fault per minute, 20 s into it, each over within 20 s, rotating
     through: nats_pause (SIGSTOP/SIGCONT of nats-server), slow_validator (an extra
     pii_guard responder in the demo queue group answering after the timeout),
     nats_restart (nats-server killed and started again on the same port),
     garbage_pre (an extra normalize_text responder answering garbage), provider_errors
     (an extra provider responder answering errors or nothing), burst (three times the
     rate) and reload_storm (registry reloads through the admin API);
  4. samples the router's resident memory every 10 s;
  5. at the end stops the load, waits for the answers, stops the router with SIGTERM
     and reports: panics in the router log, the memory series, every request's
     outcome per minute, and the checks. Exit status 0 only if every check passed.

Every request must end in an answer: a decision, or a gRPC error carrying one of the
documented error codes in its `x-beamline-error-code` trailer. Anything else
(transport error, client-side timeout, unknown code) is a failure.
"""

import argparse
import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

DOCUMENTED_CODES = (
    "invalid_request",
    "policy_not_found",
    "decision_failed",
    "extension_timeout",
    "validator_blocked",
    "pre_processor_failed",
    "post_processor_failed",
    "extension_unavailable",
    "extension_not_found",
    "deadline_exceeded",
    "extension_error",
)

FAULTS = (
    "nats_pause",
    "slow_validator",
    "nats_restart",
    "garbage_pre",
    "provider_errors",
    "burst",
    "reload_storm",
)

# The demo extensions' subjects and queue group (crates/sdk/src/reference.rs, fixtures/).
DEMO_QUEUE = "beamline-demo"
SUBJECT_PRE = "beamline.ext.pre.normalize_text.v1"
SUBJECT_VALIDATOR = "beamline.ext.validate.pii_guard.v1"
SUBJECT_PROVIDER = "beamline.provider.test_provider.v1"

FAULT_OFFSET_S = 20  # a fault starts this long into its minute
FAULT_MAX_S = 20  # and is over this long after it started
SAMPLE_EVERY_S = 10
DECIDE = "/beamline.flow.v1.Router/Decide"
ADMIN_KEY = "soak-admin-key-" + os.urandom(8).hex()


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Processes and ports.


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on, below the ephemeral range."""
    for _ in range(500):
        port = random.randint(20000, 31999)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                try:
                    s2 = socket.socket()
                    s2.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s2.bind(("127.0.0.1", port))
                    s2.close()
                    return port
                except OSError:
                    continue
    raise SystemExit("no free TCP port on 127.0.0.1")


def nats_answers(port, timeout=1.0):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


class Nats:
    """A nats-server of our own, which the faults stop, pause and restart."""

    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        logf = open(os.path.join(self.workdir, "nats-server.log"), "ab")
        for attempt in range(50):
            self.proc = subprocess.Popen(
                [self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                if nats_answers(self.port, 0.5):
                    return
                time.sleep(0.05)
            # The port may still be held a moment after a kill: try again.
            self.kill()
            time.sleep(0.2)
        raise RuntimeError(f"nats-server does not start on port {self.port}")

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def kill(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)


class Router:
    def __init__(self, binary, workdir, nats_url, breaker_timeout_s):
        self.binary = binary
        self.grpc_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.grpc_port:
            self.http_port = free_port()
        self.log_path = os.path.join(workdir, "router.log")
        env = dict(os.environ)
        for k in list(env):
            if k.startswith(("EXTENSION_REGISTRY_", "BEAMLINE_")) or k == "RUST_LOG":
                del env[k]
        env.update(
            {
                "EXTENSION_REGISTRY_SOURCE": "fixtures",
                # No database at all: health is not persisted (nothing on 5432 is touched).
                "EXTENSION_REGISTRY_DB_ENABLED": "false",
                "EXTENSION_REGISTRY_CIRCUIT_BREAKER_TIMEOUT_SECONDS": str(breaker_timeout_s),
                "BEAMLINE_NATS_URL": nats_url,
                "BEAMLINE_GRPC_LISTEN": f"127.0.0.1:{self.grpc_port}",
                "BEAMLINE_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
                "BEAMLINE_ADMIN_KEY": ADMIN_KEY,
                "BEAMLINE_LOG_LEVEL": "info",
                "RUST_BACKTRACE": "1",
            }
        )
        self.env = env
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "serve", "--demo"],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
        )

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the router exited with {self.proc.returncode} at start; log: {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the router is not ready after {timeout}s; log: {self.log_path}")

    def rss_kib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=45):
        """SIGTERM, then the exit status (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


# --------------------------------------------------------------------------------------
# A minimal NATS responder (standard library only), for the extension faults.


class Responder:
    """Subscribes to `subject` in the demo queue group, so it takes a share of the
    demo extension's requests, and answers each through `answer(body) -> (delay_s,
    reply_bytes | None)` (None: never answer)."""

    def __init__(self, port, subject, answer, name):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(None)
        self.reader = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self.answer = answer
        self.closed = False
        self.handled = 0
        info = self.reader.readline()
        if not info.startswith(b"INFO"):
            raise RuntimeError(f"not a NATS server: {info!r}")
        connect = {"verbose": False, "pedantic": False, "name": name, "protocol": 1, "headers": True, "lang": "python-soak", "version": "0"}
        self._send(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        self._send(f"SUB {subject} {DEMO_QUEUE} 1\r\nPING\r\n".encode())
        self.timers = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, data):
        with self.lock:
            if not self.closed:
                try:
                    self.sock.sendall(data)
                except OSError:
                    self.closed = True

    def _reply(self, reply_to, body):
        self._send(f"PUB {reply_to} {len(body)}\r\n".encode() + body + b"\r\n")

    def _run(self):
        try:
            while True:
                line = self.reader.readline()
                if not line:
                    return
                if line.startswith(b"PING"):
                    self._send(b"PONG\r\n")
                    continue
                parts = line.split()
                if not parts or parts[0] not in (b"MSG", b"HMSG"):
                    continue  # +OK, PONG, INFO, -ERR
                if parts[0] == b"MSG":
                    reply_to = parts[3].decode() if len(parts) == 5 else None
                    total = int(parts[-1])
                    hdr = 0
                else:
                    reply_to = parts[3].decode() if len(parts) == 6 else None
                    hdr, total = int(parts[-2]), int(parts[-1])
                data = self.reader.read(total + 2)[:total]
                body = data[hdr:]
                self.handled += 1
                if reply_to is None:
                    continue
                delay, reply = self.answer(body)
                if reply is None:
                    continue
                if delay <= 0:
                    self._reply(reply_to, reply)
                else:
                    t = threading.Timer(delay, self._reply, (reply_to, reply))
                    t.daemon = True
                    t.start()
                    self.timers.append(t)
                    if len(self.timers) > 1000:
                        self.timers = [x for x in self.timers if x.is_alive()]
        except (OSError, ValueError):
            return

    def close(self):
        for t in self.timers:
            t.cancel()
        with self.lock:
            self.closed = True
            try:
                self.sock.sendall(b"UNSUB 1\r\n")
            except OSError:
                pass
            try:
                self.sock.close()
            except OSError:
                pass


# --------------------------------------------------------------------------------------
# Protobuf, by hand: RouteRequest is small and this keeps grpcio the only dependency.


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _map(num, mapping):
    return b"".join(_field(num, _field(1, k) + _field(2, v)) for k, v in mapping.items())


def route_request(message_id, tenant_id, text, policy_id="", context=None, metadata=None):
    message = (
        _field(1, message_id)
        + _field(2, tenant_id)
        + _field(3, message_id)
        + _field(4, "chat")
        + _field(5, text)
        + _map(6, metadata or {})
    )
    return _field(1, message) + (_field(2, policy_id) if policy_id else b"") + _map(3, context or {})


def provider_id_of(decision):
    """Field 1 (provider_id) of a RouteDecision, or None."""
    i = 0
    try:
        while i < len(decision):
            key, i = _read_varint(decision, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _read_varint(decision, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                n, i = _read_varint(decision, i)
                if num == 1:
                    return decision[i : i + n].decode()
                i += n
            else:
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _read_varint(b, i):
    shift = result = 0
    while True:
        byte = b[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


# --------------------------------------------------------------------------------------
# Load.

KINDS = (
    # kind, share, what a healthy router answers
    ("normal", 0.85, "ok"),
    ("pii", 0.05, "validator_blocked"),
    ("no_policy", 0.04, "policy_not_found"),
    ("invalid", 0.03, "invalid_request"),
    ("dry_run", 0.03, "ok"),
)


def make_request(n, deadline_ms):
    r = random.random()
    acc = 0.0
    kind = KINDS[-1][0]
    for k, share, _ in KINDS:
        acc += share
        if r < acc:
            kind = k
            break
    rid = f"soak-{n}"
    tenant = f"tenant{n % 7}"
    deadline = str(int(time.time() * 1000) + deadline_ms)
    ctx = {"request_id": rid, "deadline": deadline}
    text = f"  Hello   soak   request {n}  "
    policy = ""
    if kind == "pii":
        text = f"mail me at user{n}@example.com"
    elif kind == "no_policy":
        policy = "no_such_policy"
    elif kind == "invalid":
        tenant = "bad tenant id"
    elif kind == "dry_run":
        ctx["dry_run"] = "true"
    return kind, route_request(rid, tenant, text, policy, ctx, {"channel": "soak"})


class Stats:
    def __init__(self, minutes):
        self.lock = threading.Lock()
        self.per_minute = [collections.Counter() for _ in range(minutes + 1)]
        self.latency_ok = [[] for _ in range(minutes + 1)]
        self.normal_window = collections.defaultdict(collections.Counter)  # second -> outcome counts of normal requests
        self.failures = []  # (n, kind, description)
        self.kind_outcomes = collections.defaultdict(collections.Counter)
        self.outstanding = 0
        self.sent = 0
        self.answered = 0
        self.outcomes_file = None

    def record(self, n, kind, minute, second, outcome, latency_ms, detail=""):
        with self.lock:
            self.answered += 1
            self.outstanding -= 1
            self.per_minute[minute][outcome] += 1
            self.kind_outcomes[kind][outcome] += 1
            if outcome == "ok":
                self.latency_ok[minute].append(latency_ms)
            if kind == "normal":
                self.normal_window[second][outcome] += 1
            if outcome.startswith("FAIL"):
                if len(self.failures) < 50:
                    self.failures.append((n, kind, f"{outcome} {detail}"))
            if self.outcomes_file:
                self.outcomes_file.write(f"{n},{kind},{minute},{outcome},{latency_ms:.1f}\n")


def classify(future):
    """('ok' | documented code | 'FAIL:…', detail)."""
    exc = future.exception()
    if exc is None:
        body = future.result()
        pid = provider_id_of(body)
        if not pid:
            return "FAIL:bad_decision", f"decision without provider_id ({len(body)} bytes)"
        return "ok", pid
    code = None
    try:
        for k, v in exc.trailing_metadata() or ():
            if k == "x-beamline-error-code":
                code = v
    except Exception:  # noqa: BLE001 - a failed call may not have metadata
        code = None
    status = exc.code().name if hasattr(exc, "code") else "?"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in DOCUMENTED_CODES:
        return code, details
    if code:
        return f"FAIL:undocumented_code:{code}", f"{status} {details}"
    return f"FAIL:no_code:{status}", str(details)[:200]


def load_loop(channel, stats, start, end, rate, burst, deadline_ms, client_timeout_s, max_outstanding, stop):
    decide = channel.unary_unary(DECIDE, request_serializer=None, response_deserializer=None)
    n = 0
    t = start
    while not stop.is_set():
        now = time.monotonic()
        if now >= end:
            break
        factor = 3.0 if burst.is_set() else 1.0
        t += 1.0 / (rate * factor)
        if t > now:
            time.sleep(t - now)
        elif now - t > 1.0:
            t = now  # we fell behind (a pause of this process): do not catch up in a flood
        n += 1
        sent_at = time.monotonic()
        elapsed = sent_at - start
        minute = min(int(elapsed // 60), len(stats.per_minute) - 2)
        second = int(elapsed)
        kind, body = make_request(n, deadline_ms)
        with stats.lock:
            stats.sent += 1
            if stats.outstanding >= max_outstanding:
                stats.sent -= 1
                skip = True
            else:
                stats.outstanding += 1
                skip = False
        if skip:
            with stats.lock:
                stats.per_minute[minute]["FAIL:client_backlog"] += 1
                stats.kind_outcomes[kind]["FAIL:client_backlog"] += 1
                if len(stats.failures) < 50:
                    stats.failures.append((n, kind, f"not sent: {max_outstanding} requests unanswered"))
            continue
        fut = decide.future(body, timeout=client_timeout_s)

        def done(f, n=n, kind=kind, minute=minute, second=second, sent_at=sent_at):
            latency = (time.monotonic() - sent_at) * 1000
            try:
                outcome, detail = classify(f)
            except Exception as e:  # noqa: BLE001
                outcome, detail = "FAIL:client_error", repr(e)
            stats.record(n, kind, minute, second, outcome, latency, detail)

        fut.add_done_callback(done)
    return n


# --------------------------------------------------------------------------------------
# Faults.


def garbage_reply(_body, counter=[0]):  # noqa: B006 - a counter on purpose
    counter[0] += 1
    variants = (
        b"not json at all",
        b"[1, 2, 3]",
        b'{"payload": 5}',
        b'{"metadata": "nope"}',
        b'{"payload": {"payload": 7}}',
        b'{"k":' * 30 + b"1" + b"}" * 30,
        b'{"error": {"code": "boom", "message": "garbage fault"}}',
        json.dumps({"payload": "x" * 200_000}).encode(),
        b"\xff\xfe\x00",
        b"",
    )
    return 0.0, variants[counter[0] % len(variants)]


def provider_error_reply(_body, counter=[0]):  # noqa: B006
    counter[0] += 1
    if counter[0] % 3 == 0:
        return 0.0, None  # never answered: the router times out and retries
    if counter[0] % 3 == 1:
        return 0.0, b'{"status": "error", "error_code": "rate_limited", "error_message": "soak fault"}'
    return 0.0, b'{"provider_id": ""}'


class FaultRunner:
    def __init__(self, nats, router, workdir, burst):
        self.nats = nats
        self.router = router
        self.workdir = workdir
        self.burst = burst
        self.notes = []

    def run(self, name, stop):
        """Runs fault `name`; returns a one-line description. Bounded by FAULT_MAX_S."""
        began = time.monotonic()
        fn = getattr(self, "fault_" + name)
        try:
            note = fn(stop)
        except Exception as e:  # noqa: BLE001 - a fault that cannot be injected is reported
            note = f"could not be injected: {e!r}"
        return f"{note} ({time.monotonic() - began:.1f}s)"

    def _wait(self, seconds, stop):
        stop.wait(seconds)

    def fault_nats_pause(self, stop):
        self.nats.signal(signal.SIGSTOP)
        try:
            self._wait(6, stop)
        finally:
            self.nats.signal(signal.SIGCONT)
        return "nats-server paused (SIGSTOP) for 6 s, then SIGCONT"

    def fault_nats_restart(self, stop):
        self.nats.kill()
        self._wait(4, stop)
        self.nats.start()
        return f"nats-server killed (SIGKILL), down 4 s, started again on port {self.nats.port}"

    def _responder(self, subject, answer, seconds, stop, what):
        r = Responder(self.nats.port, subject, answer, f"soak-{what}")
        try:
            self._wait(seconds, stop)
        finally:
            r.close()
        return r.handled

    def fault_slow_validator(self, stop):
        n = self._responder(SUBJECT_VALIDATOR, lambda _b: (0.6, b'{"status": "ok"}'), 15, stop, "slow-validator")
        return f"extra pii_guard responder in queue group {DEMO_QUEUE} answering after 600 ms (timeout 200 ms) for 15 s: took {n} calls"

    def fault_garbage_pre(self, stop):
        n = self._responder(SUBJECT_PRE, garbage_reply, 15, stop, "garbage-pre")
        return f"extra normalize_text responder answering garbage (non-JSON, wrong shapes, deep, 200 KB, errors) for 15 s: took {n} calls"

    def fault_provider_errors(self, stop):
        n = self._responder(SUBJECT_PROVIDER, provider_error_reply, 15, stop, "provider-errors")
        return f"extra test_provider responder answering errors, invalid replies or nothing for 15 s: took {n} calls"

    def fault_burst(self, stop):
        self.burst.set()
        try:
            self._wait(10, stop)
        finally:
            self.burst.clear()
        return "three times the request rate for 10 s"

    def fault_reload_storm(self, stop):
        ok = failed = 0
        until = time.monotonic() + 10
        while time.monotonic() < until and not stop.is_set():
            r = subprocess.run(
                [self.router.binary, "--addr", f"http://127.0.0.1:{self.router.grpc_port}", "--api-key", ADMIN_KEY, "registry", "reload"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                env=self.router.env,
            )
            if r.returncode == 0:
                ok += 1
            else:
                failed += 1
        return f"registry reload storm through the admin API for 10 s: {ok} reloads ok, {failed} refused"


# --------------------------------------------------------------------------------------


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))
    return values[k]


def count_panics(path):
    panics = []
    with open(path, "rb") as f:
        for line in f:
            if b"panicked" in line:
                panics.append(line.decode(errors="replace").rstrip())
    return panics


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--rate", type=float, default=100.0, help="Decide requests per second (default 100)")
    ap.add_argument("--router", required=True, help="the beamline-router binary")
    ap.add_argument("--nats-server", default="nats-server")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated rotation (default: all, in order)")
    ap.add_argument("--deadline-ms", type=int, default=5000, help="each request's deadline (context.deadline)")
    ap.add_argument("--breaker-timeout", type=int, default=10, help="circuit_breaker.timeout_seconds of the router")
    ap.add_argument("--workdir", default=None, help="where logs go (default: a new temporary directory)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if args.minutes < 1:
        raise SystemExit("--minutes must be at least 1")
    if args.rate <= 0 or args.rate > 2000:
        raise SystemExit("--rate must be in (0, 2000]")
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    for f in faults:
        if f not in FAULTS:
            raise SystemExit(f"unknown fault {f!r}; known: {', '.join(FAULTS)}")
    if not faults:
        raise SystemExit("--faults names no fault")
    random.seed(args.seed)
    workdir = args.workdir or tempfile.mkdtemp(prefix="beamline-soak.")
    os.makedirs(workdir, exist_ok=True)
    client_timeout_s = args.deadline_ms / 1000 + 10

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    nats = Nats(args.nats_server, workdir)
    router = None
    try:
        nats.start()
        log(f"nats-server on {nats.url} (pid {nats.proc.pid})")
        router = Router(args.router, workdir, nats.url, args.breaker_timeout)
        router.wait_ready()
        log(
            f"router pid {router.proc.pid}: gRPC 127.0.0.1:{router.grpc_port}, HTTP 127.0.0.1:{router.http_port}; "
            f"log {router.log_path}"
        )
        return soak(args, faults, workdir, nats, router, stop, client_timeout_s)
    finally:
        if router is not None and router.alive():
            router.proc.kill()
            router.proc.wait()
        nats.kill()


def soak(args, faults, workdir, nats, router, stop, client_timeout_s):
    minutes = args.minutes
    stats = Stats(minutes)
    stats.outcomes_file = open(os.path.join(workdir, "outcomes.csv"), "w", buffering=1 << 16)
    stats.outcomes_file.write("request,kind,minute,outcome,latency_ms\n")
    burst = threading.Event()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{router.grpc_port}",
        options=[("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 16 << 20)],
    )
    grpc.channel_ready_future(channel).result(timeout=10)
    log(
        f"load: {args.rate:g} Decide/s over gRPC for {minutes} min, deadline {args.deadline_ms} ms; "
        f"faults every minute at +{FAULT_OFFSET_S}s: {', '.join(faults[i % len(faults)] for i in range(minutes))}"
    )
    start = time.monotonic()
    end = start + minutes * 60
    loader = threading.Thread(
        target=load_loop,
        args=(channel, stats, start, end, args.rate, burst, args.deadline_ms, client_timeout_s, 20000, stop),
        daemon=True,
    )
    loader.start()

    runner = FaultRunner(nats, router, workdir, burst)
    fault_log = []
    rss = []  # (seconds, KiB)
    next_sample = start
    next_fault = 0
    fault_thread = None
    router_died_at = None
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_sample and now <= end + 0.5:
            rss.append((round(now - start), router.rss_kib()))
            with stats.lock:
                done, out = stats.answered, stats.outstanding
            log(f"t={now - start:5.0f}s rss={rss[-1][1]} KiB answered={done} in flight={out}")
            next_sample += SAMPLE_EVERY_S
        if not router.alive() and router_died_at is None:
            router_died_at = now - start
            log(f"the router exited ({router.proc.returncode}) at t={router_died_at:.0f}s")
            break
        if next_fault < minutes and now >= start + next_fault * 60 + FAULT_OFFSET_S and fault_thread is None:
            name = faults[next_fault % len(faults)]
            at = now - start
            log(f"fault {next_fault + 1}/{minutes}: {name}")

            def go(name=name, at=at):
                note = runner.run(name, stop)
                fault_log.append((at, name, note))
                log(f"fault {name} over: {note}")

            fault_thread = threading.Thread(target=go, daemon=True)
            fault_thread.start()
            next_fault += 1
        if fault_thread is not None and not fault_thread.is_alive():
            fault_thread = None
        if now >= end and fault_thread is None:
            break
        time.sleep(0.2)
    interrupted = stop.is_set()
    stop.set()  # ends the load loop and a running fault early (only when interrupted)
    loader.join(timeout=30)
    if fault_thread is not None:
        fault_thread.join(timeout=FAULT_MAX_S + 10)

    # Every request sent must be answered: wait for the last ones.
    wait_until = time.monotonic() + client_timeout_s + 5
    while time.monotonic() < wait_until:
        with stats.lock:
            if stats.outstanding == 0:
                break
        time.sleep(0.1)
    with stats.lock:
        unanswered = stats.outstanding
    rss_final = router.rss_kib()
    exit_status = router.stop()
    channel.close()
    stats.outcomes_file.close()
    return report(args, workdir, router, stats, rss, rss_final, fault_log, unanswered, exit_status, router_died_at, interrupted)


def report(args, workdir, router, stats, rss, rss_final, fault_log, unanswered, exit_status, router_died_at, interrupted):
    minutes = args.minutes
    print()
    print("=" * 78)
    print(f"beamline-router soak: {minutes} min at {args.rate:g} Decide/s (gRPC), logs in {workdir}")
    print("=" * 78)

    print("\nFaults:")
    for at, name, note in fault_log:
        print(f"  t={at:5.0f}s  {name:16s} {note}")

    print("\nResident memory of the router (every 10 s, KiB):")
    series = [k for _, k in rss if k is not None]
    print("  " + " ".join(f"{k}" for k in series))
    after_first = next((k for s, k in rss if s >= 60 and k is not None), series[0] if series else None)
    last = series[-1] if series else None
    flat = after_first is not None and last is not None and last <= 1.2 * after_first
    print(f"  after the first minute: {after_first} KiB; last: {last} KiB; at the end of the load: {rss_final} KiB")
    if after_first:
        print(f"  last / after the first minute = {last / after_first:.3f} (flat when <= 1.2)")

    print("\nOutcomes per minute (ok latency p50/p99 in ms):")
    codes = sorted({o for c in stats.per_minute for o in c})
    header = f"  {'min':>3} {'requests':>8}  " + "  ".join(f"{c}" for c in codes) + "   p50/p99"
    print(header)
    for m, counter in enumerate(stats.per_minute):
        total = sum(counter.values())
        if total == 0:
            continue
        lat = stats.latency_ok[m]
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        lat_s = f"{p50:.1f}/{p99:.1f}" if p50 is not None else "-"
        print(f"  {m + 1:>3} {total:>8}  " + "  ".join(f"{counter.get(c, 0):>{len(c)}}" for c in codes) + f"   {lat_s}")
    totals = collections.Counter()
    for c in stats.per_minute:
        totals.update(c)
    total = sum(totals.values())
    print(f"  all {total:>8}  " + "  ".join(f"{totals.get(c, 0):>{len(c)}}" for c in codes))

    print("\nOutcomes by kind of request (expected when healthy):")
    for kind, _, expected in KINDS:
        c = stats.kind_outcomes.get(kind, collections.Counter())
        parts = ", ".join(f"{o} {n}" for o, n in c.most_common())
        print(f"  {kind:9s} ({expected}): {parts}")

    # Recovery: the last 10 s of every minute, 20 s or more after its fault ended.
    print("\nRecovery (normal requests answered ok in the last 10 s of each minute):")
    for m in range(minutes):
        lo = m * 60 + 50
        window = collections.Counter()
        for s in range(lo, lo + 10):
            window.update(stats.normal_window.get(s, {}))
        n = sum(window.values())
        if n:
            print(f"  minute {m + 1:>2} (t={lo}..{lo + 10}s): {window['ok']}/{n} ok ({100 * window['ok'] / n:.1f} %)")

    panics = count_panics(router.log_path)
    failures = {o: n for o, n in totals.items() if o.startswith("FAIL")}
    checks = [
        ("no panic in the router log", not panics, f"{len(panics)} panics" + (f": {panics[0][:200]}" if panics else "")),
        ("the router stayed up", router_died_at is None, "exited at t=%ss" % router_died_at if router_died_at is not None else "up"),
        ("resident memory flat (last <= 1.2 x after the first minute)", flat, f"{after_first} -> {last} KiB"),
        (
            "every request answered ok or with a documented code",
            not failures and unanswered == 0 and total > 0,
            f"{total} requests, {sum(failures.values())} failures {failures}, {unanswered} unanswered",
        ),
        ("SIGTERM: the router exits 0", exit_status == 0, f"exit status {exit_status}"),
        ("the soak ran to the end", not interrupted, "interrupted" if interrupted else "complete"),
    ]
    if stats.failures:
        print("\nFirst failures:")
        for n, kind, d in stats.failures[:20]:
            print(f"  request {n} ({kind}): {d}")
    print("\nChecks:")
    for name, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    summary = {
        "minutes": minutes,
        "rate": args.rate,
        "faults": [{"t": at, "fault": name, "note": note} for at, name, note in fault_log],
        "rss_kib": rss,
        "outcomes_per_minute": [dict(c) for c in stats.per_minute],
        "panics": len(panics),
        "checks": {name: ok for name, ok, _ in checks},
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ok = all(ok for _, ok, _ in checks)
    print(f"\nsoak {'PASSED' if ok else 'FAILED'} (every request's outcome: {workdir}/outcomes.csv)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
