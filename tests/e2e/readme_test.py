"""The README tells the truth (issue 14): the paths it cites exist, its flag table lists every flag
of the broker, "Try it without Google" works as written (on free ports), it states the measured
time to the demo's first step, and the design it points to is in the repository."""
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(ROOT, "build"))
TOP = ("client/", "server/", "lib/", "tests/", "scripts/", "deploy/", "docs/", "tools/", "proto/")


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def section(text, title):
    m = re.search(r"^## " + re.escape(title) + r"\n(.*?)(?=^## )", text, re.M | re.S)
    return m.group(1) if m else ""


class ReadmeTruths(unittest.TestCase):
    def test_cited_paths_exist(self):
        text = readme()
        missing = []
        for path in sorted(set(re.findall(r"(?<![\w./$~-])((?:%s)[\w./-]*\w)" % "|".join(map(re.escape, TOP)), text))):
            if "..." in path or "<" in path or path.startswith("deploy/k8s/base/*"):
                continue
            # A source path, or a binary the build makes from one (tests/bench/loadgen).
            if not os.path.exists(os.path.join(ROOT, path)) and not os.path.exists(os.path.join(BUILD, path)):
                missing.append(path)
        for path in sorted(set(re.findall(r"(?<![\w./-])build/([\w./-]*\w)", text))):
            if not os.path.exists(os.path.join(BUILD, path)):
                missing.append("build/" + path)
        self.assertEqual(missing, [], "README cites paths that do not exist")

    def test_flag_table_lists_every_broker_flag(self):
        table = section(readme(), "Run it on your accounts").split("### Flags", 1)[1]
        in_table = set(re.findall(r"`--(\w+)`", table.split("\n\n`tokenbroker --help`")[0]))
        out = subprocess.run([os.path.join(BUILD, "server", "tokenbroker"), "--help"], capture_output=True,
                             text=True, timeout=30).stdout
        in_help = set(re.findall(r"^  --(\w+) \(", out, re.M)) | {"flagfile"}
        self.assertEqual(sorted(in_help - in_table), [], "flags missing from the README's table")
        self.assertEqual(sorted(in_table - in_help), [], "flags in the README's table the broker does not have")

    def test_design_lives_in_the_repository(self):
        stale = []
        files = ["README.md"] + glob.glob(os.path.join(ROOT, "docs", "**", "*"), recursive=True)
        files += glob.glob(os.path.join(ROOT, "deploy", "**", "*"), recursive=True)
        files += glob.glob(os.path.join(ROOT, "tools", "*.*"))
        files += [os.path.join(ROOT, p) for p in ("server/broker_main.cc", "server/monitor_main.cc",
                                                   "server/runtime/flags.h", "server/runtime/flags.cc",
                                                   "server/runtime/broker_config.cc", "server/runtime/logging.cc",
                                                   "client/tbctl.cc", "scripts/demo.py")]
        for path in files:
            path = os.path.join(ROOT, path)
            if not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if re.search(r"DESIGN §|shared/DESIGN|\.\./shared/", line):
                        stale.append(f"{os.path.relpath(path, ROOT)}:{n}")
        self.assertEqual(stale, [], "references to a design document outside the repository")
        with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
            sections = set(re.findall(r"^## (\d+)\. ", f.read(), re.M))
        for required in ("Layers", "request", "State", "Rules and where they live"):
            with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
                self.assertIn(required, f.read())
        # Every "ARCHITECTURE.md §N" anywhere in the sources names a section that exists.
        bad = []
        for path in subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True,
                                   cwd=ROOT).stdout.split():
            full = os.path.join(ROOT, path)
            if not os.path.isfile(full) or path.startswith("tests/fuzz/corpus"):
                continue
            with open(full, errors="replace") as f:
                for n in re.findall(r"ARCHITECTURE\.md §(\d+)", f.read()):
                    if n not in sections:
                        bad.append(f"{path}: §{n}")
        self.assertEqual(bad, [])
        self.assertIn("docs/ARCHITECTURE.md", readme())

    def test_demo_time_is_measured_and_stated(self):
        self.assertTrue(os.path.exists(os.path.join(ROOT, "scripts", "measure_demo_time.py")))
        self.assertIn("scripts/measure_demo_time.py", readme())
        self.assertTrue(re.search(r"first step in \d+ min \d+ s", readme()),
                        "the README states no measured time to the demo's first step")


class TryWithoutGoogle(unittest.TestCase):
    """Runs the README's "Try it without Google" block as written, on free ports and a temp folder."""

    def test_the_block_works_as_written(self):
        block = re.search(r"```sh\n(.*?)```", section(readme(), "Try it without Google"), re.S).group(1)
        commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
        tmp = tempfile.mkdtemp(prefix="tokenbroker-readme-")
        upstream_port, broker_port = harness.free_port(), harness.free_port()
        env = dict(os.environ, TOKENBROKER_TARGET=f"127.0.0.1:{broker_port}")
        background = []
        outputs = []
        try:
            for command in commands:
                command = command.split("  #")[0].strip()
                if command == "make build":
                    continue  # built already
                command = command.replace("/tmp/tb-accounts", os.path.join(tmp, "accounts")).replace(
                    "8089", str(upstream_port))
                command = re.sub(r"(?<![\w/.-])build/", BUILD + "/", command)
                if "tokenbroker " in command or command.rstrip(" &").endswith("tokenbroker"):
                    command = command.rstrip(" &") + f" --listen=127.0.0.1:{broker_port} &"
                if command.endswith("&"):
                    # A session of its own: the shell and what it starts are stopped together.
                    p = subprocess.Popen(command[:-1], shell=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
                    background.append(p)
                    port = broker_port if "--accounts_dir" in command else upstream_port

                    def listening(port=port, p=p):
                        if p.poll() is not None:
                            raise RuntimeError(f"{command} exited with {p.returncode}")
                        with socket.socket() as s:
                            return s.connect_ex(("127.0.0.1", port)) == 0
                    harness.wait_for(listening, what=command)
                    continue
                if "tbctl" in command:
                    harness.wait_for(lambda: subprocess.run(shlex.split(command.split(" list-accounts")[0]
                                                                        .split(" get-token")[0]) + ["health"],
                                                            capture_output=True, env=env).returncode == 0,
                                     what="the broker to be SERVING")
                r = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=60)
                self.assertEqual(r.returncode, 0, f"{command}: {r.stderr}")
                outputs.append(r.stdout)
            self.assertEqual(len(background), 2)
            listing = next(o for o in outputs if o.startswith("ACCOUNT"))
            for account in ("ultra-1", "pro-1", "free-1"):
                self.assertIn(account, listing)
            self.assertRegex(outputs[-1], r"account\s+ultra-1 ")
        finally:
            for p in background:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                p.wait(timeout=15)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
