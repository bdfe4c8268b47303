"""Regenerate the lock files (`make lock`): every dependency pinned, with the sha256 of its files.

    python requirements/lock.py                         # keep every pin that still resolves
    python requirements/lock.py --upgrade               # newest versions pyproject allows
    python requirements/lock.py --upgrade-package prefect

Writes, with uv's resolver (`uv pip compile --universal --generate-hashes`: platform markers
kept, every file of each pinned version hashed, so one lock serves any Linux x86_64 / aarch64
CPython >= 3.11):

- requirements/cpu.txt:  pyproject.toml with the `eval`, `dev` and `server` extras, torch's CPU build,
  the build backend. `make install` (so CI, whose .ci/run calls `make test`) and
  docker/Dockerfile.cpu install it with `pip install --require-hashes --no-deps`.
- requirements/cuda.txt: the same with PyPI's CUDA torch and its CUDA libraries, every other
  package held at the CPU lock's version (docker/Dockerfile.cuda).
- requirements/pip.txt:  the pip that installs them.

Existing pins are kept (uv reads the old output as its preferences), so a rerun changes nothing
unless pyproject.toml or the *.in files changed or an upgrade was asked for.

Then it checks that every file this machine's pip could pick for a pinned version (its
find-links directories and file:// indexes, from `pip config list`) has a hash in the lock: a
local mirror serving a different build of a file than PyPI would otherwise fail only at install.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parent.parent
REQ = REPO / "requirements"
UV_VERSION = "0.13.9"  # the resolver the committed locks were made with
PYTHON = "3.11"  # the images' Python (python:3.11-slim) and this machine's
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu/torch/"
COMMON = ["pip", "compile", "--universal", "--python-version", PYTHON, "--generate-hashes",
          "--custom-compile-command", "make lock", "--quiet"]
PROJECT = ["pyproject.toml", "--extra", "eval", "--extra", "dev", "--extra", "server"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, set[str]]]:
    """{normalized name: (version, sha256 digests)} of a lock written by uv."""
    entries: dict[str, tuple[str, set[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if (pin := PIN.match(line)):
            current = normalize(pin.group(1))
            entries[current] = (pin.group(2), set())
        elif current and (digest := HASH.search(line)):
            entries[current][1].add(digest.group(1))
    return entries


def find_uv() -> list[str]:
    """uv at UV_VERSION: $UV, else `uv` on PATH if it is that version, else a throwaway venv."""
    for candidate in (os.environ.get("UV"), shutil.which("uv")):
        if candidate:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True)
            if out.stdout.split()[1:2] == [UV_VERSION]:
                return [candidate]
    venv = Path(tempfile.gettempdir()) / f"layerprune-uv-{UV_VERSION}"
    uv = venv / "bin" / "uv"
    if not uv.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", f"uv=={UV_VERSION}"], check=True)
    return [str(uv)]


def pip_config() -> dict[str, list[str]]:
    """pip's find-links and index URLs as configured on this machine (files, environment)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        key = key.rsplit(".", 1)[-1]
        if key in ("find-links", "index-url", "extra-index-url"):
            found.setdefault(key, []).extend(value.strip("'\"").split())
    return found


def torch_cpu_links(config: dict[str, list[str]]) -> str:
    """Where uv finds torch's CPU wheel: a local find-links directory that holds it (this
    machine: /opt/wheels), else PyTorch's CPU index page for torch."""
    for link in config.get("find-links", []):
        path = Path(unquote(urlparse(link).path) if link.startswith("file:") else link)
        if path.is_dir() and any(path.glob("torch-*+cpu-*.whl")):
            return str(path)
    return TORCH_CPU_INDEX


def local_files(config: dict[str, list[str]], name: str, version: str):
    """(file, sha256) of every file of `name==version` that pip could take from this machine's
    find-links directories and file:// indexes."""
    def matches(filename: str) -> bool:
        stem = filename[:-4] if filename.endswith(".whl") else filename.removesuffix(".tar.gz")
        fname, _, rest = stem.partition("-")
        fversion = rest.split("-")[0] if filename.endswith(".whl") else rest
        return normalize(fname) == name and fversion == version

    for link in config.get("find-links", []):
        path = Path(unquote(urlparse(link).path) if link.startswith("file:") else link)
        if path.is_dir():
            for f in path.iterdir():
                if matches(f.name):
                    yield f, hashlib.sha256(f.read_bytes()).hexdigest()
    for index in config.get("index-url", []) + config.get("extra-index-url", []):
        if not index.startswith("file:"):
            continue
        page = Path(unquote(urlparse(index).path)) / name / "index.html"
        if not page.is_file():
            continue
        for href in re.findall(r'href="([^"]+)"', page.read_text()):
            url, _, fragment = href.partition("#")
            f = (page.parent / unquote(url)).resolve()
            if matches(f.name):
                digest = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") \
                    else hashlib.sha256(f.read_bytes()).hexdigest()
                yield f, digest


def check_local_mirrors(locks: list[Path]) -> int:
    config = pip_config()
    checked, bad = 0, []
    for lock in locks:
        for name, (version, digests) in read_lock(lock).items():
            for f, digest in local_files(config, name, version):
                checked += 1
                if digest not in digests:
                    bad.append(f"{lock.name}: {f} (sha256 {digest}) is not among {name}=="
                               f"{version}'s hashes: pip here would refuse it")
    for line in bad:
        print(line, file=sys.stderr)
    print(f"local mirrors: {checked} files of pinned versions checked, {len(bad)} unknown")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upgrade", action="store_true", help="the newest versions allowed")
    ap.add_argument("--upgrade-package", action="append", default=[], metavar="NAME")
    args = ap.parse_args(argv)
    upgrade = (["--upgrade"] if args.upgrade else []) + \
        [a for p in args.upgrade_package for a in ("--upgrade-package", p)]
    uv = find_uv()
    config = pip_config()
    os.chdir(REPO)  # uv writes the paths it was given into the locks' comments: keep them short

    def compile_(*extra: str, out: str) -> None:
        subprocess.run([*uv, *COMMON, *upgrade, *extra, "-o", out], check=True)

    compile_(*PROJECT, "requirements/cpu.in", "--find-links", torch_cpu_links(config),
             out="requirements/cpu.txt")
    # The CUDA lock holds every shared package at the CPU lock's version: constraints from it,
    # less torch (its CPU build is not on PyPI).
    cpu = read_lock(REQ / "cpu.txt")
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "cpu-pins.txt"
        pins.write_text("".join(f"{n}=={v}\n" for n, (v, _) in sorted(cpu.items())
                                if n != "torch"))
        compile_(*PROJECT, "requirements/cuda.in", "-c", str(pins), out="requirements/cuda.txt")
        cuda = REQ / "cuda.txt"
        cuda.write_text(cuda.read_text().replace(str(pins), "requirements/cpu.txt (less torch)"))
    compile_("requirements/pip.in", out="requirements/pip.txt")
    return check_local_mirrors([REQ / "pip.txt", REQ / "cpu.txt", REQ / "cuda.txt"])


if __name__ == "__main__":
    sys.exit(main())
