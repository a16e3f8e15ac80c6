"""Structural checks of the compose example: docker-compose.yml, Dockerfile and nginx.conf.

No Docker engine is needed. The files are parsed and checked against each other: the
replicas build the image that runs ``examples/agent_server.py``, every variable the image's
command reads is set by compose, and the port the replicas listen on is the one nginx and
the healthchecks use. One test runs the image's command and the compose healthcheck on this
machine (the agent card needs no Redis) to check the quoting, not just the text.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"
COMPOSE = EXAMPLES / "docker-compose.yml"
DOCKERFILE = EXAMPLES / "Dockerfile"
NGINX = EXAMPLES / "nginx.conf"
REPLICAS = ("replica-1", "replica-2")
CARD_PATH = "/.well-known/agent-card.json"
# nginx's default proxy_read_timeout is 60 s: a quiet SSE stream would be cut after a minute.
MIN_READ_TIMEOUT = 600.0
# How the image's command maps its environment onto agent_server.py's options.
ARG_VARS = {
    "--port": "PORT",
    "--redis-url": "REDIS_URL",
    "--prefix": "A2A_PREFIX",
    "--name": "REPLICA_NAME",
    "--public-url": "PUBLIC_URL",
}


# --- compose ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def as_argv(value: str | list[Any]) -> list[str]:
    """A compose command or healthcheck test, string or list form, as a list of strings."""
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{service: condition}``; the short (list) form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def replica_port(service: dict[str, Any]) -> int:
    """The port a replica listens on: compose's PORT, else the image's default."""
    port = environment(service).get("PORT", dockerfile_env().get("PORT"))
    assert port is not None, "no PORT for the replica, in compose or the Dockerfile"
    return int(port)


def healthcheck_url(service: dict[str, Any]) -> str:
    check = service.get("healthcheck")
    assert check, "no healthcheck"
    found = re.search(r"https?://[^\s'\"]+", " ".join(as_argv(check["test"])))
    assert found, f"healthcheck does not fetch a URL: {check['test']}"
    return found.group()


def test_services_exist(services: dict[str, Any]) -> None:
    assert {"redis", *REPLICAS, "lb"} <= set(services)


def test_redis_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith(("redis:7", "docker.io/library/redis:7"))
    argv = as_argv(redis["command"])
    assert argv[0] == "redis-server"
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") == "everysec"
    assert options.get("--maxmemory-policy") == "noeviction"
    test = as_argv(redis["healthcheck"]["test"])
    assert "redis-cli" in " ".join(test)
    assert "ping" in [t.lower() for t in test]
    volumes = [str(v) for v in redis["volumes"]]
    named = [v.split(":")[0] for v in volumes if v.split(":")[1] == "/data"]
    assert named, "no volume on /data"
    assert named[0] in (compose.get("volumes") or {}), "the /data volume is not a named volume"


@pytest.mark.parametrize("name", REPLICAS)
def test_replica_builds_the_example_image(services: dict[str, Any], name: str) -> None:
    build = services[name]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    # The image's CMD is what runs agent_server.py; the checks below rely on it.
    assert "command" not in services[name]
    assert "entrypoint" not in services[name]
    assert services[name].get("restart") in ("always", "unless-stopped", "on-failure")
    assert "ports" not in services[name], "replicas are reached through the balancer only"


@pytest.mark.parametrize("name", REPLICAS)
def test_replica_waits_for_a_healthy_redis(services: dict[str, Any], name: str) -> None:
    assert depends_on(services[name]).get("redis") == "service_healthy"
    url = urlsplit(environment(services[name])["REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert (url.port or 6379) == 6379


def test_replicas_share_redis_and_prefix_but_not_names(services: dict[str, Any]) -> None:
    envs = [environment(services[name]) for name in REPLICAS]
    assert len({env["REDIS_URL"] for env in envs}) == 1
    assert len({env.get("A2A_PREFIX", "a2a") for env in envs}) == 1, "one prefix, one cluster"
    names = [env.get("REPLICA_NAME") for env in envs]
    assert None not in names
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", REPLICAS)
def test_compose_sets_every_variable_the_image_reads(services: dict[str, Any], name: str) -> None:
    missing = command_variables() - set(environment(services[name]))
    assert not missing, f"{name} does not set {sorted(missing)}"


@pytest.mark.parametrize("name", REPLICAS)
def test_replica_healthcheck_fetches_the_agent_card(services: dict[str, Any], name: str) -> None:
    test = as_argv(services[name]["healthcheck"]["test"])
    assert test[0] in ("CMD", "CMD-SHELL")
    # python:3.11-slim has neither curl nor wget.
    assert not {"curl", "wget"} & set(" ".join(test).split())
    url = urlsplit(healthcheck_url(services[name]))
    assert url.hostname in ("127.0.0.1", "localhost")
    assert url.port == replica_port(services[name])
    assert url.path == CARD_PATH


def test_lb_publishes_nginx_and_mounts_its_config(services: dict[str, Any]) -> None:
    lb = services["lb"]
    assert str(lb["image"]).startswith(("nginx:", "docker.io/library/nginx:"))
    ports = [str(p) for p in lb["ports"]]
    assert len(ports) == 1
    assert ports[0].split(":")[-1] == nginx_listen_port()
    mounts = [str(v).split(":") for v in lb["volumes"]]
    config = [m for m in mounts if m[1] == "/etc/nginx/nginx.conf"]
    assert config, "nginx.conf is not mounted as /etc/nginx/nginx.conf"
    source, _, *mode = config[0]
    assert (COMPOSE.parent / source).resolve() == NGINX
    assert mode == ["ro"]
    assert set(REPLICAS) <= set(depends_on(lb))


def test_replica_port_matches_nginx_upstream(services: dict[str, Any]) -> None:
    ports = {replica_port(services[name]) for name in REPLICAS}
    assert len(ports) == 1
    (port,) = ports
    assert upstream_servers() == {f"{name}:{port}" for name in REPLICAS}


# --- nginx.conf -------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = field(default=None)


_TOKEN = re.compile(r"#[^\n]*|\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};]+")
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)?")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _tokens(text: str) -> Iterator[str]:
    for match in _TOKEN.finditer(text):
        token = match.group()
        if not token.startswith("#"):
            yield token[1:-1] if token[0] in "\"'" else token


def _parse(tokens: Iterator[str], nested: bool = False) -> list[Directive]:
    directives: list[Directive] = []
    words: list[str] = []
    for token in tokens:
        if token in (";", "{"):
            assert words, f"empty directive before {token!r}"
            block = _parse(tokens, nested=True) if token == "{" else None
            directives.append(Directive(words[0], words[1:], block))
            words = []
        elif token == "}":
            assert nested and not words, "unbalanced '}' or a directive without ';'"
            return directives
        else:
            words.append(token)
    assert not nested and not words, "unterminated block or directive"
    return directives


def nginx() -> list[Directive]:
    return _parse(_tokens(NGINX.read_text()))


def find(directives: list[Directive], name: str) -> list[Directive]:
    """Every directive called ``name``, at any depth."""
    found = []
    for directive in directives:
        if directive.name == name:
            found.append(directive)
        found += find(directive.block or [], name)
    return found


def only(directives: list[Directive], name: str) -> Directive:
    found = [d for d in directives if d.name == name]
    assert len(found) == 1, f"expected one {name!r}, found {len(found)}"
    return found[0]


def seconds(value: str) -> float:
    """An nginx time (``3600``, ``60s``, ``1h``, ``1h30m``) in seconds."""
    assert re.fullmatch(r"(?:\d+(?:ms|s|m|h|d|w)?)+", value), value
    return sum(int(n) * _SECONDS[unit or "s"] for n, unit in _DURATION.findall(value))


def upstream() -> Directive:
    (block,) = find(nginx(), "upstream")
    return block


def upstream_servers() -> set[str]:
    return {d.args[0] for d in upstream().block or [] if d.name == "server"}


def root_location() -> list[Directive]:
    locations = [d for d in find(nginx(), "location") if d.args == ["/"]]
    assert len(locations) == 1
    return locations[0].block or []


def nginx_listen_port() -> str:
    (listen,) = find(nginx(), "listen")
    return listen.args[0].rsplit(":", 1)[-1]


def test_nginx_config_parses() -> None:
    directives = nginx()
    assert only(directives, "events").block is not None
    assert only(directives, "http").block is not None
    assert seconds("1h30m") == 5400
    assert seconds("3600") == 3600


def test_upstream_is_plain_round_robin() -> None:
    names = {d.name for d in upstream().block or []}
    sticky = {"ip_hash", "hash", "sticky", "least_conn", "least_time", "random"}
    assert not names & sticky, f"balancing must stay round robin: {names & sticky}"
    assert len(upstream_servers()) == len(REPLICAS)


def test_root_location_proxies_to_the_upstream() -> None:
    location = root_location()
    assert only(location, "proxy_pass").args == [f"http://{upstream().args[0]}"]
    assert only(location, "proxy_http_version").args == ["1.1"]


def test_sse_is_not_buffered_or_cut() -> None:
    location = root_location()
    assert only(location, "proxy_buffering").args == ["off"]
    assert only(location, "proxy_cache").args == ["off"]
    assert seconds(only(location, "proxy_read_timeout").args[0]) >= MIN_READ_TIMEOUT


def test_proxy_headers_are_forwarded() -> None:
    headers = {
        d.args[0].lower(): d.args[1] for d in root_location() if d.name == "proxy_set_header"
    }
    assert headers.get("connection") == ""
    assert headers.get("host", "").startswith("$")
    assert headers.get("x-forwarded-for") == "$proxy_add_x_forwarded_for"
    assert headers.get("x-forwarded-proto") == "$scheme"
    assert "x-forwarded-host" in headers


# --- Dockerfile -------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, rest)`` pairs, continuation lines joined and comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            pairs = shlex.split(rest)
            assert all("=" in p for p in pairs), f"use ENV KEY=value: {rest}"
            env.update(p.split("=", 1) for p in pairs)
    return env


def command() -> list[str]:
    """The image's ENTRYPOINT + CMD as an argv (shell form runs under ``/bin/sh -c``)."""
    argv: list[str] = []
    for keyword in ("ENTRYPOINT", "CMD"):
        found = [rest for kw, rest in instructions() if kw == keyword]
        if found:
            rest = found[-1]
            argv += json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
    return argv


def command_variables() -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", " ".join(command())))


def test_image_is_small_and_runs_as_non_root() -> None:
    steps = instructions()
    assert [rest for kw, rest in steps if kw == "FROM"] == ["python:3.11-slim"]
    users = [rest for kw, rest in steps if kw == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_image_installs_the_package_with_server_and_hiredis() -> None:
    runs = " ".join(rest for kw, rest in instructions() if kw == "RUN")
    found = re.search(r"pip install [\"']?\.\[([^\]]*)\]", runs)
    assert found, "the image does not pip install the package from the build context"
    assert {"server", "hiredis"} <= {e.strip() for e in found.group(1).split(",")}


def test_image_copies_only_files_in_the_build_context() -> None:
    copies = [shlex.split(rest) for kw, rest in instructions() if kw in ("COPY", "ADD")]
    sources = [src for args in copies for src in args[:-1] if not src.startswith("--")]
    assert "examples/agent_server.py" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the build context"


def test_image_runs_the_agent_server_from_its_environment() -> None:
    argv = command()
    script = " ".join(argv)
    assert "examples/agent_server.py" in script
    mapped = dict(re.findall(r"(--[\w-]+)\s+[\"']?\$\{?(\w+)", script))
    assert mapped == ARG_VARS
    assert re.search(r"--host\s+[\"']?0\.0\.0\.0", script), "listen on all interfaces"
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        assert argv[2].startswith("exec "), "exec, so the server gets SIGTERM as PID 1"
    assert command_variables() <= set(dockerfile_env()), "give every variable a default"


def test_agent_server_accepts_the_options() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "agent_server.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for option in ("--host", *ARG_VARS):
        assert option in result.stdout


# --- the command and the healthcheck, run here ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_healthcheck(test: list[str], env: dict[str, str]) -> int:
    argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_command_and_healthcheck_work_together(services: dict[str, Any]) -> None:
    """The image's CMD as compose runs it, on a free port, then the replica's healthcheck."""
    service = services[REPLICAS[0]]
    port, compose_port = free_port(), str(replica_port(service))
    env = {
        **os.environ,
        **dockerfile_env(),
        **environment(service),
        "PORT": str(port),
        # A Redis that is not there: serving the agent card does not touch it.
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    test = [
        t.replace(f":{compose_port}/", f":{port}/") for t in as_argv(service["healthcheck"]["test"])
    ]
    # Its own process group, so nothing outlives the test even if the CMD forgets `exec`.
    server = subprocess.Popen(
        command(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60  # a hang guard: a loaded machine starts slowly
        while run_healthcheck(test, env) != 0:
            assert server.poll() is None, f"the server exited with {server.returncode}"
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.3)
        server.terminate()  # what `docker stop` sends to PID 1
        server.wait(timeout=15)
        assert run_healthcheck(test, env) != 0, "the server outlived SIGTERM to the command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)
