"""Deployment as admins do it: the wheel (built with the interpreter under test) installs into a
fresh venv with its data files, `init` writes the config, `check` accepts it; the systemd unit
and compose.yaml are valid."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from .conftest import IMAGE, ROOT, GatewayProc, pubkey, unmount_under

DATA_FILES = ("share/dind/Dockerfile", "share/dind/Dockerfile.debian", "share/dind/dind-init",
              "share/config/gateway.yaml", "share/config/users.yaml",
              "share/scripts/build-images.sh", "share/packaging/dind-gateway.service",
              "share/packaging/prometheus.yml", "share/packaging/dind-gateway-alerts.yml",
              "share/packaging/grafana-dashboard.json",
              "backend/docker/profiles/seccomp-rootless.json",
              "backend/docker/profiles/apparmor-rootless")


def run(*argv: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, (argv, r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed (not editable)."""
    tmp = tmp_path_factory.mktemp("pkg")
    # a copy of the sources: building in the checkout would leave build/ and *.egg-info behind
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "state", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", ".pytest-shims"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
        "-w", tmp / "wheels", src)
    wheels = list((tmp / "wheels").glob("dind_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "-q", wheels[0])
    return venv


def package_dir(venv: Path) -> Path:
    out = run(venv / "bin" / "python", "-c", "import gateway, os; print(os.path.dirname("
              "gateway.__file__))", cwd="/")
    return Path(out.stdout.strip())


def test_wheel_ships_its_data_files(installed: Path) -> None:
    pkg = package_dir(installed)
    assert not str(pkg).startswith(str(ROOT)), pkg  # the installed copy, not the checkout
    missing = [f for f in DATA_FILES if not (pkg / f).is_file()]
    assert not missing, missing
    assert (pkg / "share/dind/dind-init").stat().st_mode & stat.S_IXUSR
    out = run(installed / "bin" / "python", "-c", "from gateway import share; "
              "print(share.path('dind'))", cwd="/")
    assert Path(out.stdout.strip()) == pkg / "share" / "dind"


def test_init_then_check(installed: Path, tmp_path: Path) -> None:
    cli = installed / "bin" / "dind-gateway"
    etc = tmp_path / "etc"
    r = run(cli, "init", "--dir", etc, "--state-dir", tmp_path / "state", cwd="/")
    assert f"{etc / 'gateway.yaml'}: written" in r.stdout
    assert f"{etc / 'users.yaml'}: written" in r.stdout
    conf = yaml.safe_load((etc / "gateway.yaml").read_text())
    assert conf["state_dir"] == str(tmp_path / "state")
    r = run(cli, "check", "--config", etc / "gateway.yaml", cwd="/")
    assert ": ok" in r.stdout
    # never overwritten
    (etc / "users.yaml").write_text("users: {}\n")
    r = run(cli, "init", "--dir", etc, cwd="/")
    assert r.stdout.count("exists, not overwritten") == 2
    assert (etc / "users.yaml").read_text() == "users: {}\n"


def test_installed_gateway_serves_a_login(installed: Path, tmp_path: Path,
                                          keys: dict[str, Path], docker_client) -> None:
    """`init`, then the installed command (not the checkout) serves alice her container."""
    etc = tmp_path / "etc"
    run(installed / "bin" / "dind-gateway", "init", "--dir", etc, "--state-dir",
        tmp_path / "state", cwd="/")
    gw = GatewayProc(tmp_path, keys)
    conf = yaml.safe_load((etc / "gateway.yaml").read_text())
    conf.update(listen=f"127.0.0.1:{gw.port}", image=IMAGE, prefix=gw.prefix)
    (etc / "gateway.yaml").write_text(yaml.safe_dump(conf))
    (etc / "users.yaml").write_text(yaml.safe_dump(
        {"users": {"alice": {"keys": [pubkey(keys["alice"])]}}}))
    gw.proc = subprocess.Popen([installed / "bin" / "dind-gateway", "serve", "--config",
                                etc / "gateway.yaml"], cwd="/", stdout=subprocess.PIPE,
                               stderr=open(gw.log, "ab"))  # noqa: SIM115 - the child's
    try:
        assert gw.proc.stdout is not None
        line = gw.proc.stdout.readline().decode()  # printed once it listens
        assert "listening on" in line, (line, gw.tail())
        r = gw.ssh("alice", "echo $USER in $(hostname)")
        assert r.returncode == 0, (r.stderr, gw.tail())
        assert r.stdout == b"alice in alice-devbox\n"
    finally:
        gw.teardown(docker_client)
        unmount_under(tmp_path / "state")


def test_systemd_unit_verifies(installed: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed (scripts/dev.sh installs systemd)")
    unit = (ROOT / "packaging" / "dind-gateway.service").read_text()
    # the unit names the pipx location; point it at this venv's command
    unit = unit.replace("/usr/local/bin/dind-gateway", str(installed / "bin" / "dind-gateway"))
    path = tmp_path / "dind-gateway.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                       capture_output=True, text=True, timeout=60)
    # docker.service may be absent here (dockerd started by hand): only about our unit
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "dind-gateway.service" in line and "docker.service" not in line]
    assert not problems, r.stdout + r.stderr


def test_compose_file() -> None:
    import re

    # the file's ${VAR:-default} overrides (DGW_ETC_DIR, ...) at their defaults
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", (ROOT / "compose.yaml").read_text())
    assert "${" not in text
    compose = yaml.safe_load(text)
    gw = compose["services"]["gateway"]
    assert gw["network_mode"] == "host"
    assert "/var/run/docker.sock:/var/run/docker.sock" in gw["volumes"]
    assert any(isinstance(v, str) and v.endswith(":/etc/dind-gateway:ro") for v in gw["volumes"])
    state = [v for v in gw["volumes"] if isinstance(v, dict)]
    assert state and state[0]["target"] == "/var/lib/dind-gateway"
    assert state[0]["bind"]["propagation"] == "rshared"
    # Debian 12's docker-compose (v1) accepts it as written (it is started in
    # tests/test_gateway_image.py); v1 refuses a top-level `name:` and `create_host_path`
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (scripts/dev.sh installs it)")
    run("docker-compose", "-p", "dgw-check", "-f", ROOT / "compose.yaml", "config", "-q",
        cwd=ROOT)
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if plugin.returncode != 0:  # said in the summary, not skipped: the parse above ran
        warnings.warn("the docker compose plugin is not installed: compose.yaml checked by "
                      "parsing only", stacklevel=1)
        return
    run("docker", "compose", "-f", ROOT / "compose.yaml", "config", "-q", cwd=ROOT,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "dgw-check"})


def test_monitoring_files() -> None:
    import json

    import gateway.observe.metrics as m

    names = {c.name for c in m.Metrics().registry.collect()}
    rules = yaml.safe_load((ROOT / "packaging" / "dind-gateway-alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {"DindGatewayEngineDown", "DindGatewaySpawnFailures", "DindGatewayBans",
            "DindGatewayUserDiskNearQuota"} <= set(alerts)
    dash = json.loads((ROOT / "packaging" / "grafana-dashboard.json").read_text())
    exprs = list(alerts.values()) + [t["expr"] for p in dash["panels"] for t in p["targets"]]
    # every dgw_ series named exists (counters are exposed with _total, histograms _bucket)
    import re

    for expr in exprs:
        for series in re.findall(r"\bdgw_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", series)
            assert base in names, (series, expr)
    prom = yaml.safe_load((ROOT / "packaging" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "dind-gateway"
