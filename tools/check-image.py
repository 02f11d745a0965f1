#!/usr/bin/python3
"""Checks deploy/Dockerfile offline, without Docker: that the image would start and is built the way
we promise.

  /usr/bin/python3 tools/check-image.py --build build [--dockerfile deploy/Dockerfile]

- Every shared library the shipped binaries load (`ldd` on the binaries built here, on Debian 12 like
  the image) belongs to a package (`dpkg -S`) that the runtime stage installs, directly or as a
  dependency (`apt-cache depends --recurse`): a missing one (libhiredis0.14 was) means a container
  that cannot start.
- A .dockerignore keeps build trees, node_modules and .git out of the context.
- The build stage installs its dependencies before `COPY . .` (so that layer caches) and builds only
  the binaries the image ships.
- The default command does not serve the API beyond loopback in plaintext without caller tokens.
Prints every problem, exits 1 if any.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def stages(dockerfile_text):
    """[(name, [instruction lines])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile_text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
            out.append((m.group(1) or "", []))
        elif out:
            out[-1][1].append(line)
    return out


def apt_packages(instructions):
    pkgs = []
    for ins in instructions:
        if not ins.upper().startswith("RUN "):
            continue
        for command in re.split(r"&&|;", ins[4:]):
            words = command.split()
            if "apt-get" in words and "install" in words:
                pkgs += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return pkgs


def closure(packages):
    """The packages and everything they depend on, from the local apt/dpkg database (offline)."""
    r = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                        "--no-breaks", "--no-replaces", "--no-enhances"] + packages,
                       capture_output=True, text=True)
    names = set()
    for line in r.stdout.splitlines():
        if not line.startswith(" "):
            names.add(line.strip().strip("<>").split(":")[0])
        else:
            m = re.match(r"\s*\|?(?:Pre)?Depends:\s*<?([^>\s]+)>?", line)
            if m:
                names.add(m.group(1).split(":")[0])
    return names


def owners(paths):
    """{path: package} for the shared libraries at `paths` (dpkg -S, batched; /usr-merged aliases tried)."""
    aliases = {}
    for path in paths:
        for p in (path, os.path.realpath(path)):
            aliases.setdefault(p, path)
            aliases.setdefault(p[4:] if p.startswith("/usr/") else "/usr" + p, path)
    r = subprocess.run(["dpkg", "-S"] + sorted(aliases), capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        pkgs, _, p = line.partition(": ")
        if p.strip() in aliases:
            out.setdefault(aliases[p.strip()], pkgs.split(",")[0].split(":")[0].strip())
    return out


def libraries(binary):
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ldd {binary}: {r.stderr.strip() or r.stdout.strip()}")
    libs = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(\S+)\s*=>\s*(\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if not m:
            continue
        name, path = (m.group(1), m.group(2)) if m.lastindex == 2 else (os.path.basename(m.group(1)), m.group(1))
        if path == "not":
            libs[name] = None  # "not found" on this machine
        else:
            libs[name] = path
    return libs


def check(build, dockerfile):
    problems = []
    with open(dockerfile) as f:
        text = f.read()
    st = stages(text)
    if len(st) < 2:
        return [f"{dockerfile}: expected a build stage and a runtime stage"], []
    build_stage, runtime = st[0][1], st[-1][1]

    # .dockerignore next to the context root (or Dockerfile-specific).
    ignore_file = next((p for p in (dockerfile + ".dockerignore", os.path.join(ROOT, ".dockerignore"))
                        if os.path.exists(p)), None)
    if ignore_file is None:
        problems.append(".dockerignore is missing: build trees, node_modules and .git would be sent to Docker")
    else:
        with open(ignore_file) as f:
            patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        for need, what in (("build", "build trees"), ("node_modules", "node_modules"), (".git", ".git")):
            if not any(need in p for p in patterns):
                problems.append(f"{os.path.relpath(ignore_file, ROOT)}: does not exclude {what}")

    copy_all = next((i for i, ins in enumerate(build_stage) if re.match(r"COPY\s+\.\s+\S+$", ins)), None)
    deps = next((i for i, ins in enumerate(build_stage) if ins.startswith("RUN") and "deps.sh" in ins), None)
    if deps is None:
        problems.append("build stage: dependencies are not installed with scripts/deps.sh")
    elif copy_all is not None and deps > copy_all:
        problems.append("build stage: dependencies are installed after COPY . . (every source change reinstalls them)")
    shipped = []
    for ins in runtime:
        m = re.match(r"COPY\s+--from=\S+\s+(.+)\s+\S+$", ins)
        if m:
            shipped += [os.path.basename(p) for p in m.group(1).split()]
    builds = " ".join(ins for ins in build_stage if ins.startswith("RUN"))
    targets = set(re.findall(r"--target\s+([^&]+)", builds)[0].split()) if "--target" in builds else set()
    if not targets:
        problems.append("build stage: builds every target; build only the binaries the image ships (--target)")
    elif set(shipped) - targets:
        problems.append(f"build stage: ships {sorted(set(shipped) - targets)} without building them")

    # The default command: the API on loopback or a unix socket unless callers must present tokens.
    args = []
    for ins in runtime:
        if ins.upper().startswith(("CMD", "ENTRYPOINT")):
            body = ins.split(None, 1)[1]
            args += re.findall(r'"([^"]*)"', body) if body.startswith("[") else shlex.split(body)
    listen = next((a.split("=", 1)[1] for a in args if a.startswith("--listen=")), "127.0.0.1:50051")
    open_to_all = listen.startswith(("0.0.0.0:", "[::]:", ":")) or listen.split(":")[0] in ("", "0.0.0.0", "::")
    if open_to_all and not any(a.startswith("--caller_tokens_file=") for a in args):
        problems.append(f"default command serves the API on {listen} in plaintext without --caller_tokens_file")

    # Every shared library of every shipped binary comes with the runtime packages.
    packages = apt_packages(runtime)
    provided = closure(packages)
    unknown = [p for p in packages if p not in provided]
    for p in unknown:
        problems.append(f"runtime stage installs {p}, which apt does not know here (a typo, or another Debian release?)")
    where = {"tokenbroker": ("server",), "tokenbroker-monitor": ("server",), "tbctl": ("client",)}
    report = []
    needs = {}
    for name in shipped:
        binary = os.path.join(build, *where.get(name, ()), name)
        if not os.path.exists(binary):
            problems.append(f"{binary} is not built (cmake --build {build} --target {name})")
            continue
        needs[name] = {lib: path for lib, path in libraries(binary).items() if not lib.startswith("linux-vdso")}
    package_of = owners({path for libs in needs.values() for path in libs.values() if path})
    for name, libs in needs.items():
        for lib, path in sorted(libs.items()):
            if path is None:
                problems.append(f"{name}: {lib} is not found even here")
                continue
            pkg = package_of.get(path)
            if pkg is None:
                problems.append(f"{name}: {lib} ({path}) belongs to no Debian package")
            elif pkg not in provided:
                problems.append(f"{name}: needs {lib}, from package {pkg}, which the runtime stage does not install")
            report.append((name, lib, pkg))
    return problems, report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    parser.add_argument("--dockerfile", default=os.path.join(ROOT, "deploy", "Dockerfile"))
    args = parser.parse_args()
    problems, report = check(args.build, args.dockerfile)
    if problems:
        print(f"docker image: {len(problems)} problem(s)\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    libs = {lib for _, lib, _ in report}
    pkgs = {pkg for _, _, pkg in report}
    print(f"docker image: {len(libs)} shared libraries of the shipped binaries all come from the runtime stage's "
          f"packages ({len(pkgs)} packages); .dockerignore, layer order, targets and default command as promised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
