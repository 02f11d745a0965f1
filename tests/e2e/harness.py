"""Starts the real binaries (fake upstream, broker) on free loopback ports in a temp folder.

Shared by the end-to-end tests and `make demo`. Standard library only (/usr/bin/python3).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request


# How much slower the binaries under test run than a release build: 1, or what the sanitizer tree
# sets (tests/CMakeLists.txt). Latency bounds of tests multiply by it; nothing else does.
SLOWDOWN = float(os.environ.get("TB_E2E_SLOWDOWN", "1"))


def wait_for(cond, timeout=15.0, what="condition"):
    """Polls cond() until it is truthy or the deadline passes; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def write_callers_file(folder, tokens, name="callers.txt"):
    """A --caller_tokens_file in `folder`: one `<caller> <token>` line per entry of `tokens` (a dict).
    Returns its path."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("".join(f"{caller} {token}\n" for caller, token in tokens.items()))
    return path


def account_json(email, refresh_token, tier, **extra):
    """An account file body in Antigravity-Manager's format."""
    doc = {
        "id": email.split("@")[0],
        "email": email,
        "name": email.split("@")[0].title(),
        "token": {
            "access_token": "",
            "refresh_token": refresh_token,
            "expires_in": 0,
            "expiry_timestamp": 0,
            "token_type": "Bearer",
            "project_id": "proj-" + email.split("@")[0],
        },
        "quota": {"models": [], "subscription_tier": tier, "is_forbidden": False},
        "disabled": False,
        "disabled_reason": None,
        "proxy_disabled": False,
        "protected_models": [],
        "created_at": 1764000000,
    }
    doc.update(extra)
    return doc


class Process:
    def __init__(self, name, argv, log_path, port_file, env=None):
        self.name = name
        self.log_path = log_path
        self.port_file = port_file
        if os.path.exists(port_file):
            os.remove(port_file)
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        self.port = int(wait_for(self._read_port, what=f"{name} to listen"))

    def _read_port(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.read_log()}")
        try:
            with open(self.port_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def read_log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def quota_exhausted_body(model, delay):
    """A 429 QUOTA_EXHAUSTED answer of Cloud Code, as in upstream-formats.md, with `delay` ("3s")."""
    return json.dumps({"error": {
        "code": 429, "status": "RESOURCE_EXHAUSTED",
        "message": f"You have exhausted your capacity on this model. Your quota will reset after {delay}.",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "QUOTA_EXHAUSTED",
             "domain": "cloudcode-pa.googleapis.com",
             "metadata": {"model": model, "quotaResetDelay": delay}},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
        ]}})


def free_port():
    """A loopback TCP port nobody listens on right now (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, its files in `folder`. With `persist`, every
    write is fsynced to an append-only file, so a SIGKILL and a restart keep the keys."""

    def __init__(self, folder, persist=False):
        self.folder = folder
        self.persist = persist
        self.port = free_port()
        self.proc = None
        self.runs = 0
        self.start()

    def start(self):
        import redis  # python3-redis (Debian)
        self.runs += 1
        self.log = open(os.path.join(self.folder, f"redis-{self.runs}.log"), "ab")
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.folder,
                "--save", "", "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
                "--protected-mode", "no", "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

        def pong():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                return self.client.ping()
            except redis.exceptions.ConnectionError:
                return False
        wait_for(pong, what="redis-server to answer PING")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def kill(self):
        """SIGKILL: the way a crash or an evicted pod goes."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def stop(self):
        self.kill()


class Cluster:
    """A temp folder with an accounts/ dir, a fake upstream and (re)startable brokers."""

    def __init__(self, build_dir, buf=None):
        self.build_dir = os.path.abspath(build_dir)
        self.buf = os.path.abspath(buf) if buf else None
        self.dir = tempfile.mkdtemp(prefix="tokenbroker-e2e-")
        self.accounts_dir = os.path.join(self.dir, "accounts")
        os.mkdir(self.accounts_dir)
        self.upstream = None
        self.broker = None
        self.broker_runs = 0
        self.monitor_runs = 0
        self.extra = []  # other processes to stop at close

    def bin(self, *parts):
        return os.path.join(self.build_dir, *parts)

    def write_account(self, account_id, doc):
        path = os.path.join(self.accounts_dir, account_id + ".json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        os.chmod(path, 0o600)
        return path

    def start_upstream(self):
        self.upstream = Process(
            "fake_upstream",
            [self.bin("tests", "fakes", "fake_upstream"), "--port_file", os.path.join(self.dir, "upstream.port")],
            os.path.join(self.dir, "upstream.log"),
            os.path.join(self.dir, "upstream.port"),
        )
        return self.upstream

    def upstream_call(self, path, body=None):
        url = f"http://127.0.0.1:{self.upstream.port}{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().decode())

    def _start_daemon(self, name, binary, flags, listen, log_path, port_file, runner=()):
        """Starts tokenbroker or tokenbroker-monitor against this cluster's folder and fake upstream."""
        argv = list(runner) + [
            binary,
            "--accounts_dir", self.accounts_dir,
            "--listen", listen,
            "--port_file", port_file,
            "--oauth_token_url", f"http://127.0.0.1:{self.upstream.port}/token",
            "--cloudcode_base_url", f"http://127.0.0.1:{self.upstream.port}",
            "--reload_interval", "200ms",
        ] + list(flags)
        # The OAuth client comes from the environment, as an operator would pass a secret.
        env = dict(os.environ, TOKENBROKER_OAUTH_CLIENT_ID="demo-client",
                   TOKENBROKER_OAUTH_CLIENT_SECRET="demo-secret")
        process = Process(name, argv, log_path, port_file, env=env)
        self.extra.append(process)
        return process

    def start_monitor(self, *flags, listen="127.0.0.1:0"):
        self.monitor_runs += 1
        self.monitor = self._start_daemon(
            "tokenbroker-monitor", self.bin("server", "tokenbroker-monitor"), flags, listen,
            os.path.join(self.dir, f"monitor-{self.monitor_runs}.log"), os.path.join(self.dir, "monitor.port"))
        return self.monitor

    def start_broker(self, *flags, listen="127.0.0.1:0", binary=None, runner=(), run_dir=None):
        """Starts a broker. `runner` prefixes the command (e.g. to run it as another user); the port
        file goes to `run_dir` (default: the cluster's folder)."""
        self.broker_runs += 1
        self.broker = self._start_daemon(
            "tokenbroker", binary or self.bin("server", "tokenbroker"), flags, listen,
            os.path.join(self.dir, f"broker-{self.broker_runs}.log"),
            os.path.join(run_dir or self.dir, f"broker-{self.broker_runs}.port"), runner=runner)
        return self.broker

    @property
    def target(self):
        return f"127.0.0.1:{self.broker.port}"

    def tbctl(self, *args, check=True, target=None):
        argv = [self.bin("client", "tbctl"), "--target", target or self.target] + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"tbctl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def tbctl_json(self, *args, target=None):
        return json.loads(self.tbctl("--json", *args, target=target).stdout)

    def buf_curl(self, method, body=None, target=None):
        """Calls `method` ("pkg.Service/Method") with buf curl, schema from server reflection only."""
        argv = [self.buf, "curl", "--http2-prior-knowledge", "--protocol", "grpc"]
        if body is not None:
            argv += ["--data", json.dumps(body)]
        argv.append(f"http://{target or self.target}/{method}")
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=self.dir)

    def broker_logs(self):
        out = []
        for i in range(1, self.broker_runs + 1):
            with open(os.path.join(self.dir, f"broker-{i}.log"), encoding="utf-8", errors="replace") as f:
                out.append(f.read())
        return "\n".join(out)

    def close(self):
        """Stops every process and removes the folder. Raises if a process's log holds a sanitizer
        report (the ASan + UBSan binaries of `make test`): a finding fails the test that closes."""
        findings = []
        for p in self.extra + [self.upstream]:
            if p is not None:
                p.stop()
                report = sanitizer_report(p.read_log()) if isinstance(p, Process) else ""
                if report:
                    findings.append(f"{p.name} ({p.log_path}):\n{report}")
        shutil.rmtree(self.dir, ignore_errors=True)
        if findings:
            raise AssertionError("sanitizer report:\n" + "\n".join(findings))


# The first line of a report of AddressSanitizer, LeakSanitizer, UndefinedBehaviorSanitizer,
# ThreadSanitizer, or Abseil's lock-order cycle detection.
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer", "Potential Mutex deadlock")


def sanitizer_report(log):
    """The lines of `log` from the first sanitizer report on (at most 60), or "" if there is none."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if any(marker in line for marker in SANITIZER_MARKERS):
            return "\n".join(lines[max(0, i - 2):i + 60])
    return ""


def read_varint(data, i):
    """The protobuf varint at data[i:] and the index past it."""
    value, shift = 0, 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def proto_fields(data):
    """Decodes the protobuf wire format (e.g. gRPC rich error details, read without their .proto):
    {field number: [values]}, varints as int, everything else as bytes."""
    fields, i = {}, 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tokenbroker-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=folder)
        with open(os.path.join(folder, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)
