"""The offline deployment checks catch what breaks a real cluster or image (issue 14): manifests
rendered with kubectl kustomize and validated by tools/validate-k8s.mjs, and deploy/Dockerfile checked
by tools/check-image.py against the binaries built here. Each check is shown to pass on the repo's
files and to fail, naming the fault, on a copy that has it."""
import os
import re
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("TB_BUILD_DIR", os.path.join(ROOT, "build"))
VALIDATOR = os.path.join(ROOT, "tools", "validate-k8s.mjs")
IMAGE_CHECK = os.path.join(ROOT, "tools", "check-image.py")


def validate(*dirs, cwd=ROOT):
    return subprocess.run(["node", VALIDATOR, *dirs], capture_output=True, text=True, timeout=120, cwd=cwd)


class Manifests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="tokenbroker-k8s-")
        shutil.copytree(os.path.join(ROOT, "deploy"), os.path.join(self.dir, "deploy"))

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def edit(self, rel, old, new):
        path = os.path.join(self.dir, rel)
        with open(path) as f:
            text = f.read()
        self.assertIn(old, text, rel)
        with open(path, "w") as f:
            f.write(text.replace(old, new))

    def check_fails(self, *expected, overlay="deploy/k8s/overlays/redis"):
        r = validate(overlay, cwd=self.dir)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        for e in expected:
            self.assertIn(e, r.stderr)

    def test_the_repo_manifests_pass(self):
        r = validate("deploy/k8s/base", "deploy/k8s/overlays/redis")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("placeholders to replace before applying", r.stdout)
        self.assertIn("Secret tokenbroker-oauth", r.stdout)

    def test_overlay_objects_without_a_namespace(self):
        self.edit("deploy/k8s/overlays/redis/kustomization.yaml", "namespace: tokenbroker\n", "")
        self.check_fails("Deployment/tokenbroker-redis: no namespace", "Secret/tokenbroker-redis: no namespace",
                         "env TOKENBROKER_REDIS_PASSWORD reads Secret tokenbroker-redis, which is not in namespace")

    def test_non_root_pod_that_cannot_read_its_secret(self):
        self.edit("deploy/k8s/base/monitor-deployment.yaml", "        fsGroup: 10001\n", "")
        self.check_fails("tokenbroker-monitor/monitor: runs as non-root but cannot read volume accounts",
                         overlay="deploy/k8s/base")

    def test_readable_by_mode_bits_is_fine(self):
        self.edit("deploy/k8s/base/monitor-deployment.yaml", "        fsGroup: 10001\n", "")
        self.edit("deploy/k8s/base/monitor-deployment.yaml", "defaultMode: 0400", "defaultMode: 0444")
        r = validate("deploy/k8s/base", cwd=self.dir)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_deprecated_patches_json6902(self):
        self.edit("deploy/k8s/overlays/redis/kustomization.yaml", "patches:\n", "patchesJson6902:\n")
        self.check_fails("'patchesJson6902' is deprecated")

    def test_namespace_that_nothing_creates(self):
        self.edit("deploy/k8s/base/kustomization.yaml", "  - namespace.yaml\n", "")
        self.check_fails("namespace tokenbroker is used but no Namespace object creates it", overlay="deploy/k8s/base")


class Image(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="tokenbroker-image-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def check(self, dockerfile=None):
        argv = ["/usr/bin/python3", IMAGE_CHECK, "--build", BUILD]
        if dockerfile:
            argv += ["--dockerfile", dockerfile]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    def variant(self, old, new):
        with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
            text = f.read()
        self.assertIn(old, text)
        path = os.path.join(self.dir, "Dockerfile")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        return path

    def test_the_repo_dockerfile_passes(self):
        r = self.check()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"docker image: \d+ shared libraries")

    def test_a_missing_runtime_library_is_named(self):
        r = self.check(self.variant(" libhiredis0.14 ", " "))
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertRegex(r.stderr, r"tokenbroker: needs libhiredis\.so\.0\.14, from package libhiredis0\.14")

    def test_dependencies_after_the_sources_and_an_open_default_command(self):
        text_old = "COPY scripts/deps.sh scripts/deps.sh\nRUN bash scripts/deps.sh --build-only && rm -rf /var/lib/apt/lists/*\nCOPY . .\n"
        path = self.variant(text_old, "COPY . .\nRUN bash scripts/deps.sh --build-only\n")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(re.sub(r'"--listen=[^"]*"', '"--listen=0.0.0.0:50051"', text)
                    .replace("--target tokenbroker tokenbroker-monitor tbctl", ""))
        r = self.check(path)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("dependencies are installed after COPY . .", r.stderr)
        self.assertIn("default command serves the API on 0.0.0.0:50051 in plaintext without --caller_tokens_file",
                      r.stderr)
        self.assertIn("builds every target", r.stderr)

    def test_dockerignore_keeps_build_trees_and_history_out(self):
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            patterns = f.read().split()
        for p in (".git", "build", "build-*", "**/node_modules"):
            self.assertIn(p, patterns)


if __name__ == "__main__":
    unittest.main()
