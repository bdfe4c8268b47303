"""Reproducible installs: the locks pin every dependency by version and sha256, within
pyproject.toml's bounds, and they are what `make install` (so CI's `make test`) and both Docker
images install, with nothing resolved or downloaded beside them.

Offline and fast: the locks, pyproject.toml and the installed distributions' metadata are read;
the Makefile is expanded by make itself (`make -n`), .ci/run and the Dockerfiles are split into
commands with shlex.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
REQ = REPO / "requirements"
CPU, CUDA, PIP = REQ / "cpu.txt", REQ / "cuda.txt", REQ / "pip.txt"
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    req: Requirement
    hashes: list[str] = field(default_factory=list)

    @property
    def version(self) -> Version:
        (spec,) = self.req.specifier
        return Version(spec.version)


def read_lock(path: Path) -> dict[str, list[Pin]]:
    """A requirements file as pip reads it: continuation lines joined, comments dropped; each
    line one requirement and its --hash options. Anything else (an option, a URL, an editable
    install, a line with no exact pin) fails here."""
    pins: dict[str, list[Pin]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        words = line.split(" --hash=")
        req = Requirement(words[0].strip())
        pin = Pin(req, [f"--hash={h.strip()}" for h in words[1:]])
        assert not req.url and not req.extras, f"{path.name}: {line[:80]}"
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", \
            f"{path.name}: {req} is not pinned to one version"
        pins.setdefault(canonicalize_name(req.name), []).append(pin)
    return pins


def applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": extra})


def pin_here(lock: dict[str, list[Pin]], name: str) -> Pin:
    """The lock's pin of `name` whose marker holds on this machine."""
    found = [p for p in lock.get(canonicalize_name(name), []) if applies(p.req)]
    assert len(found) == 1, f"{name}: {len(found)} pins apply here"
    return found[0]


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    return [Requirement(r) for r in (project["project"]["dependencies"] + extras["eval"]
                                     + extras["dev"] + project["build-system"]["requires"])]


@pytest.mark.parametrize("path", [CPU, CUDA, PIP], ids=lambda p: p.name)
def test_every_line_pins_one_version_with_its_file_hashes(path):
    lock = read_lock(path)
    assert lock, f"{path.name} pins nothing"
    for name, pins in lock.items():
        for pin in pins:
            assert pin.hashes, f"{path.name}: {pin.req} has no --hash"
            bad = [h for h in pin.hashes if not SHA256.fullmatch(h)]
            assert not bad, f"{path.name}: {pin.req}: {bad}"


@pytest.mark.parametrize("path", [CPU, CUDA], ids=lambda p: p.name)
def test_lock_pins_everything_pyproject_names_within_its_bounds(path):
    lock = read_lock(path)
    for req in pyproject_requirements():
        pin = pin_here(lock, req.name)
        assert req.specifier.contains(pin.version, prereleases=True), \
            f"{path.name} pins {req.name}=={pin.version}, outside pyproject's {req}: `make lock`"


def test_cpu_lock_is_closed_under_dependencies_and_is_what_is_installed():
    """Everything the project needs here, walked from pyproject through each installed
    distribution's own requirements (markers and extras applied), is pinned in the lock at the
    installed version and within every bound that asks for it; so the lock misses nothing that
    `pip install --no-deps` would then leave out."""
    lock = read_lock(CPU)
    todo = [(req, "") for req in pyproject_requirements()]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        req, extra = todo.pop()
        if not applies(req, extra):
            continue
        pin = pin_here(lock, req.name)
        assert req.specifier.contains(pin.version, prereleases=True), \
            f"the lock's {req.name}=={pin.version} breaks the requirement {req}"
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            installed = None
        assert installed == pin.version, \
            f"{req.name} {installed or 'is not'} installed, the lock has {pin.version}: make install"
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        for sub in metadata.requires(req.name) or []:
            sub = Requirement(sub)
            wanted = [e for e in ("", *req.extras) if applies(sub, e)]
            if wanted:
                todo.append((sub, wanted[0]))
    assert len(seen) > 100  # the walk did go through the dependency tree


def test_cuda_lock_is_the_cpu_lock_with_the_cuda_torch():
    cpu, cuda = read_lock(CPU), read_lock(CUDA)
    cpu_torch, cuda_torch = pin_here(cpu, "torch").version, pin_here(cuda, "torch").version
    assert cpu_torch.local == "cpu" and cuda_torch.local is None
    assert cpu_torch.public == cuda_torch.public
    shared = (cpu.keys() & cuda.keys()) - {"torch"}
    assert len(shared) > 150
    for name in shared:
        assert [p.version for p in cpu[name]] == [p.version for p in cuda[name]], name
    extra = cuda.keys() - cpu.keys()
    assert "nvidia-cublas" in extra and "triton" in extra
    assert all(n.startswith(("nvidia-", "cuda-")) or n == "triton" for n in extra), extra


# --- who installs what ---------------------------------------------------------------------

def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell text: words split as the shell would, at newlines,
    `;`, `&&`, `||` and `|`; comments dropped. (No quoted newlines in the texts read here.)"""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True  # words end only at blanks and operators: URLs stay whole
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    return [c for c in out if c]


def pip_installs(cmds: list[list[str]]) -> list[list[str]]:
    """The arguments after `pip install` of every command that runs it."""
    found = []
    for cmd in cmds:
        for i in range(len(cmd) - 1):
            if cmd[i + 1] == "install" and (cmd[i] == "pip" and (i == 0 or cmd[i - 1] == "-m")
                                            or Path(cmd[i]).name in ("pip", "pip3")):
                found.append(cmd[i + 2:])
                break
    return found


# pip install's options that take a value (the rest used here are flags)
VALUED = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
          "-f", "--find-links", "-e", "--editable"}


def split_args(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """({option: [values]}, positional arguments) of a pip install command line."""
    options: dict[str, list[str]] = {}
    positional = []
    words = iter(args)
    for word in words:
        if word in VALUED:
            options.setdefault(word, []).append(next(words))
        elif word.startswith("-"):
            options.setdefault(word, [])
        else:
            positional.append(word)
    return options, positional


def check_installs(installs: list[list[str]], lock: str) -> None:
    """The pinned pip, then `lock`, both with --require-hashes --no-deps; then only the project
    itself, --no-deps and built without an unpinned build environment. Nothing else."""
    assert len(installs) == 3, installs
    for args, wanted in zip(installs, ["requirements/pip.txt", lock]):
        options, positional = split_args(args)
        assert options.get("-r") == [wanted] and not positional, args
        assert "--require-hashes" in options and "--no-deps" in options, args
        assert not options.keys() & {"-c", "--constraint", "-e", "--editable"}, args
    options, positional = split_args(installs[2])
    assert "--no-deps" in options and "--no-build-isolation" in options, installs[2]
    assert positional + options.get("-e", []) == ["."], installs[2]
    assert "-r" not in options, installs[2]


def make_dry_run(*args: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    run = subprocess.run(["make", "-n", "-B", "-C", str(REPO), "--no-print-directory", *args],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    return commands(run.stdout)


@pytest.mark.parametrize("lock", [None, "requirements/cuda.txt"])
def test_make_install_installs_exactly_the_lock(lock):
    cmds = make_dry_run("install", *([f"LOCK={lock}"] if lock else []))
    check_installs(pip_installs(cmds), lock or "requirements/cpu.txt")
    assert [".venv/bin/python", "-m", "pip", "check"] in cmds  # the lock is complete


def test_ci_runs_make_test_which_installs_the_lock_before_testing():
    ci = commands((REPO / ".ci" / "run").read_text())
    assert ["make", "test"] in ci
    assert not pip_installs(ci)  # CI installs nothing of its own
    cmds = make_dry_run("test")
    check_installs(pip_installs(cmds), "requirements/cpu.txt")
    lock_at = next(i for i, c in enumerate(cmds) if "requirements/cpu.txt" in c)
    pytest_at = next(i for i, c in enumerate(cmds) if "pytest" in c)
    assert lock_at < pytest_at


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comment lines dropped
    (Docker drops them inside a continued instruction too)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines()
            if ln.strip()]


def load_lock_tool():
    spec = importlib.util.spec_from_file_location("lock_tool", REQ / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("image, lock", [("Dockerfile.cpu", "requirements/cpu.txt"),
                                         ("Dockerfile.cuda", "requirements/cuda.txt")])
def test_images_install_exactly_their_lock(image, lock):
    steps = dockerfile(REPO / "docker" / image)
    base = next(arg for op, arg in steps if op == "FROM").split()[-1]
    # The locks are made for this Python (torch's CPU wheel in the lock is its build).
    assert base.startswith(f"python:{load_lock_tool().PYTHON}-"), base
    copied: set[str] = set()  # paths under WORKDIR that COPY has put there so far
    installs = []
    for op, arg in steps:
        if op == "COPY":
            *sources, dest = shlex.split(arg)
            dest = dest.removeprefix("./")
            copied |= {str(Path(dest) / Path(s).name) if dest.endswith("/") or len(sources) > 1
                       else dest for s in sources}
        if op == "RUN":
            for args in pip_installs(commands(arg)):
                files = split_args(args)[0].get("-r", [])
                assert set(files) <= copied, f"{files} installed before it is copied in"
                installs.append(args)
    check_installs(installs, lock)
    index = split_args(installs[1])[0].get("--extra-index-url", [])
    # torch's CPU build is only on PyTorch's CPU index; the CUDA build is PyPI's own
    assert index == (["https://download.pytorch.org/whl/cpu"] if image.endswith("cpu") else [])


def _without_pip_configuration(tmp_path) -> dict:
    """An environment with no pip configuration at all (no config file, no PIP_* variables), as
    on a machine outside this workplace."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAKE", "PIP_")) and k != "VIRTUAL_ENV"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "HOME": str(tmp_path)}


def _lock_install(env: dict, *args: str) -> list[str]:
    run = subprocess.run(["make", "-n", "-B", "-C", str(REPO), "--no-print-directory",
                          "install", *args], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return [a for a in pip_installs(commands(run.stdout)) if "-r" in a and
            not any(x.endswith("pip.txt") for x in a)][0]


def test_cpu_torch_comes_from_pytorchs_cpu_index_where_pip_has_no_copy(tmp_path):
    """PyPI does not host torch's +cpu builds: with no pip configuration the CPU lock's install
    names PyTorch's CPU index (catches a Makefile that works only where pip is configured with a
    local wheel directory); the CUDA lock (PyPI's torch) names none."""
    bare = _without_pip_configuration(tmp_path)
    options, _ = split_args(_lock_install(bare))
    assert options.get("--extra-index-url") == ["https://download.pytorch.org/whl/cpu"]
    options, _ = split_args(_lock_install(bare, "LOCK=requirements/cuda.txt"))
    assert "--extra-index-url" not in options


def test_a_gpu_install_stays_a_gpu_install(tmp_path):
    """After `make install LOCK=requirements/cuda.txt`, a plain make target keeps that lock (the
    venv remembers it) instead of putting CPU torch back; LOCK=... still chooses."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".lock").write_text("requirements/cuda.txt\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    options, _ = split_args(_lock_install(env, f"VENV={venv}"))
    assert options["-r"] == ["requirements/cuda.txt"]
    options, _ = split_args(_lock_install(env, f"VENV={venv}", "LOCK=requirements/cpu.txt"))
    assert options["-r"] == ["requirements/cpu.txt"]
    assert [f"echo requirements/cuda.txt > {venv}/.lock"] != []  # written by the recipe:
    run = subprocess.run(["make", "-n", "-B", "-C", str(REPO), "--no-print-directory", "install",
                          f"VENV={venv}"], capture_output=True, text=True, env=env, timeout=120)
    assert f"echo requirements/cuda.txt > {venv}/.lock" in run.stdout


@pytest.mark.parametrize("python, machine, ok", [((3, 11), "x86_64", True),
                                                  ((3, 12), "x86_64", False),
                                                  ((3, 11), "aarch64", False)])
def test_make_install_says_in_one_line_when_the_locks_do_not_fit(python, machine, ok):
    script = (REPO / "requirements" / "check_python.py").read_text()
    fake = (f"import platform, sys\nplatform.machine = lambda: {machine!r}\n"
            f"sys.version_info = {tuple(python) + (0, 'final', 0)!r}\n")
    run = subprocess.run([sys.executable, "-c", fake + script], capture_output=True, text=True)
    assert (run.returncode == 0) == ok
    if not ok:
        assert len(run.stderr.strip().splitlines()) == 1
        assert "the locks cover CPython 3.11 on Linux x86_64" in run.stderr
