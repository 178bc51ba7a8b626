"""Soak: real ``chatstream serve`` processes on one store, mixed traffic, store faults on a schedule.

Starts ``--processes`` servers (default 2) sharing one SQLite file or one Redis, drives them from
``--clients`` concurrent users (httpx, each with its own cookie jar and a marker word in all it
writes; every second user also runs a side loop in the same session on another process), and
injects faults in turn every ``--fault-every`` seconds:

* ``sigstop``: one server process stopped past its conversation lease, then continued;
* ``disk_full`` (SQLite): the database's own small tmpfs filled to the last block, then emptied;
* ``redis_kill`` (Redis): redis-server killed and started again on the same port (AOF, fsync always);
* ``redis_pause`` (Redis): ``CLIENT PAUSE`` past the lease.

Traffic: ``/chat_stream`` turns (some left at a random moment, some read slowly), regenerate and
edit, conversations created, renamed and deleted, reads, ``/v1/chat/completions`` (streamed or
not). At the end, with every fault over, it verifies over HTTP *and* from the store itself:

* lost: an acknowledged write missing: a turn that ended with ``done`` (its input and reply), a
  2xx create or rename (title), a 2xx delete (the conversation must be gone);
* cross_user: text with another user's marker in a user's answers or in a session's stored data;
* bad_5xx: a 5xx other than 503 (507 ``store_full`` only while the disk is full, and never for a delete);
* bad_stream_end: a stream that ended with neither ``done`` nor ``error``, or an ``error`` code
  other than the store's (``store_unavailable``, ``lease_lost``, ``store_full`` while full);
* transport: a connection error or timeout the harness did not cause; a server process that died;
* leak: resident memory or open descriptors of a server process that do not stay flat.

It prints a summary (and ``--json`` writes it) and exits 1 on any violation. Bounded in time and
count, loopback only. Example (what benchmarks/RESULTS.md reports)::

    .venv/bin/python -m benchmarks.soak --duration 1200 --store sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

MARKER = re.compile(r"SOAK[0-9A-F]{8}")
FAULTS = {"sqlite": ("sigstop", "disk_full"), "redis": ("redis_kill", "sigstop", "redis_pause")}
STORE_ERRORS = {"store_unavailable", "lease_lost"}  # stream errors a store fault may cause
GRACE_S = 3.0  # after a fault ends, what it caused may still be answered
TIMEOUT_S = 60.0  # per request: longer than any stall a fault causes
MAX_TURNS = 10  # per conversation before the user starts another
MAX_CONVERSATIONS = 6  # per loop
REPORTED = 20  # violation messages kept (all are counted)


@dataclass
class SoakConfig:
    duration_s: float = 1200.0
    store: str = "sqlite"
    engine: str = "mock"
    processes: int = 2
    clients: int = 16
    fault_every_s: float = 30.0
    faults: tuple[str, ...] = ()  # default: FAULTS[store]
    lease_s: float = 2.0
    token_delay_s: float = 0.02
    sample_every_s: float = 5.0
    disk_mib: int = 64
    max_rss_growth_mib: float = 64.0
    max_fd_growth: int = 32
    seed: int = 0
    workdir: str | None = None


@dataclass
class Results:
    config: dict[str, Any]
    wall_s: float = 0.0
    actions: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    stream_ends: Counter[str] = field(default_factory=Counter)
    during_faults: Counter[str] = field(default_factory=Counter)  # answers and stream ends while one lasted
    faults: list[dict[str, Any]] = field(default_factory=list)
    acknowledged: Counter[str] = field(default_factory=Counter)
    verified: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)

    def violation(self, kind: str, message: str) -> None:
        self.violations[kind] += 1
        if len(self.examples) < REPORTED:
            self.examples.append(f"{kind}: {message}")


# -- the servers and the store -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Store:
    """The shared store: an SQLite file on its own tmpfs (when mounting works), or a redis-server."""

    def __init__(self, kind: str, workdir: Path, disk_mib: int) -> None:
        self.kind = kind
        self.workdir = workdir
        self.redis: subprocess.Popen[bytes] | None = None
        self.mounted: Path | None = None
        self.filler: Path | None = None
        if kind == "sqlite":
            disk = workdir / "disk"
            disk.mkdir()
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk_mib}m,mode=0700", "tmpfs", str(disk)],
                                     capture_output=True, text=True)
            self.mounted = disk if mounted.returncode == 0 else None
            self.db = disk / "sessions.db"
            self.url = f"sqlite:///{self.db}"
        else:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.start_redis()

    def start_redis(self) -> None:
        # Appendonly with fsync before every reply: what Redis acknowledged survives a kill -9.
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(timeout=10)

    def fill_disk(self) -> None:
        assert self.mounted is not None
        self.filler = self.mounted / "filler"
        fd = os.open(self.filler, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = 1 << 20
            while size >= 4096:  # take every free block, in halving steps
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                except OSError:
                    size //= 2
        finally:
            os.close(fd)

    def empty_disk(self) -> None:
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
            self.filler = None

    def contents(self) -> dict[str, str]:
        """Every stored value, by key (``<session>`` or ``<session>/<conversation>``): documents, and
        conversations stored in rows (their head and messages' JSON texts, joined)."""
        found: dict[str, str] = {}
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)) as db:
                db.execute("BEGIN")  # one snapshot for both layouts
                found.update(db.execute("SELECT id, data FROM sessions"))
                for key, data in db.execute(
                        "SELECT c.id, c.head || ',' || coalesce(group_concat(m.data, ','), '') FROM conversations c "
                        "LEFT JOIN messages m ON m.conversation = c.id GROUP BY c.id"):
                    found[key] = found.get(key, "") + data
            return found
        import redis

        client = redis.Redis(port=self.port)
        try:
            prefix = "chatstream:session:"
            found.update((key.decode()[len(prefix):], (client.get(key) or b"").decode())
                         for key in client.scan_iter(match=prefix + "*", count=1000))
            prefix = "chatstream:conv:"
            for key in client.scan_iter(match=prefix + "*", count=1000):
                rows = ",".join(value.decode() for value in client.hgetall(key).values())
                found[key.decode()[len(prefix):]] = found.get(key.decode()[len(prefix):], "") + rows
            return found
        finally:
            client.close()

    def close(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(timeout=10)
        if self.mounted is not None:
            subprocess.run(["umount", "-l", str(self.mounted)], check=False)


class Servers:
    def __init__(self, config: SoakConfig, store: Store, workdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.logs: list[Path] = []
        env = {**os.environ, "CHATSTREAM_SESSION_STORE": store.url, "CHATSTREAM_SESSION_SECRET": "soak-secret",
               "CHATSTREAM_DATA_DIR": str(workdir / "data"), "CHATSTREAM_SESSION_LEASE_S": str(config.lease_s)}
        engine = ["--mock", "--mock-token-delay", str(config.token_delay_s)] if config.engine == "mock" else \
            ["--max-new-tokens", "48", "--threads", "1"]
        for n in range(config.processes):
            port = free_port()
            log = workdir / f"server{n}.log"
            with open(log, "wb") as out:  # a file, not a pipe nobody reads: a full pipe would stall the server
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "chatstream.cli", "serve", *engine, "--port", str(port), "--concurrency", "8",
                     "--queue-size", "64", "--new-sessions-per-minute", "0", "--log-level", "warning"],
                    env=env, stdout=out, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")
            self.logs.append(log)

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for url, proc, log in zip(self.urls, self.procs, self.logs):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{url} exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} never became healthy")
                time.sleep(0.2)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def sample(pid: int) -> tuple[float, int]:
    """(resident MiB, open descriptors) of a process."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


# -- what each user was told ---------------------------------------------------------------------------

@dataclass
class Conversation:
    id: str
    titles: set[str]  # the acknowledged title, plus any a failed rename may still have set
    texts: list[str] = field(default_factory=list)  # acknowledged inputs and replies
    turns: int = 0
    changes: int = 0  # regenerates and edits (stored versions are capped at 10)
    may_be_gone: bool = False  # a delete whose answer never came


@dataclass
class Loop:
    conversations: dict[str, Conversation] = field(default_factory=dict)


class User:
    def __init__(self, soak: Soak, n: int) -> None:
        self.soak = soak
        self.rng = random.Random(soak.config.seed * 1000 + n)
        self.marker = f"SOAK{self.rng.getrandbits(32):08X}"
        # Idle connections are dropped after 2 s, before the servers' 5 s keep-alive, as clients should:
        # else a request sent just as the server closes an idle connection is reset (HTTP/1.1's race).
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S, limits=httpx.Limits(keepalive_expiry=2.0))
        self.loops = [Loop(), Loop()]
        self.deleted: set[str] = set()
        self.unsure_creates = 0
        self.sequence = 0

    def url(self, path: str, avoid: str | None = None) -> str:
        urls = [u for u in self.soak.servers.urls if u != avoid] or self.soak.servers.urls
        return self.rng.choice(urls) + path

    def text(self) -> str:
        self.sequence += 1
        words = " ".join(self.rng.choice(("alpha", "bravo", "delta", "echo", "kilo", "lima", "tango"))
                         for _ in range(self.rng.randint(2, 12)))
        return f"{self.marker} q{self.sequence} {words}"

    def check_markers(self, where: str, text: str) -> None:
        for found in set(MARKER.findall(text)) - {self.marker}:
            self.soak.results.violation("cross_user", f"{self.marker} read {found} in {where}")

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request; its status counted and judged; None when no answer came."""
        name = f"{method} {re.sub(r'/[0-9a-f]{16,}', '/{id}', path.split('?')[0])}"
        url = self.url(path)
        try:
            r = await self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            self.soak.transport_error(name, url, exc)
            return None
        self.soak.judge_status(name, r)
        self.check_markers(name, r.text)
        return r

    # -- actions ----------------------------------------------------------------------------------------

    async def run(self, deadline: float) -> None:
        # The first write sets the session cookie; only then may a second loop share it.
        while time.monotonic() < deadline:
            if await self.create(self.loops[0]) is not None:
                break
            await asyncio.sleep(0.5)
        side = self.soak.users.index(self) % 2 == 0
        loops = [self.loop(self.loops[0], deadline, main=True)]
        if side:
            loops.append(self.loop(self.loops[1], deadline, main=False))
        await asyncio.gather(*loops)

    async def loop(self, loop: Loop, deadline: float, main: bool) -> None:
        weights = {"turn": 40, "regenerate": 8, "edit": 6, "create": 6, "rename": 10, "delete": 5, "v1": 10,
                   "read": 15} if main else {"turn": 30, "create": 20, "rename": 30, "read": 20}
        names, cumulative = list(weights), list(weights.values())
        while time.monotonic() < deadline:
            action = self.rng.choices(names, cumulative)[0]
            self.soak.results.actions[action] += 1
            await getattr(self, action)(loop)
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))

    def pick(self, loop: Loop) -> Conversation | None:
        live = [c for c in loop.conversations.values() if not c.may_be_gone]
        return self.rng.choice(live) if live else None

    async def create(self, loop: Loop) -> Conversation | None:
        if len(loop.conversations) >= MAX_CONVERSATIONS:
            await self.delete(loop)
            return None
        title = f"{self.marker} t{self.sequence}"
        self.sequence += 1
        r = await self.request("POST", "/conversations", json={"title": title})
        if r is None or r.status_code != 201:
            self.unsure_creates += r is None or r.status_code >= 500
            return None
        conversation = Conversation(r.json()["id"], {title})
        loop.conversations[conversation.id] = conversation
        self.soak.results.acknowledged["creates"] += 1
        return conversation

    async def rename(self, loop: Loop) -> None:
        conversation = self.pick(loop)
        if conversation is None:
            return
        title = f"{self.marker} t{self.sequence}"
        self.sequence += 1
        r = await self.request("PATCH", f"/conversations/{conversation.id}", json={"title": title})
        if r is not None and r.status_code == 200:
            conversation.titles = {title}
            self.soak.results.acknowledged["renames"] += 1
        elif r is None or r.status_code >= 500:
            conversation.titles.add(title)  # refused or unknown: it may or may not have happened
        else:
            self.check_refusal(conversation, r)

    async def delete(self, loop: Loop) -> None:
        if len(loop.conversations) <= 2:
            return
        conversation = self.pick(loop)
        if conversation is None:
            return
        r = await self.request("DELETE", f"/conversations/{conversation.id}")
        if r is not None and r.status_code == 200:
            del loop.conversations[conversation.id]
            self.deleted.add(conversation.id)
            self.soak.results.acknowledged["deletes"] += 1
        elif r is None or r.status_code >= 500:
            conversation.may_be_gone = True
        else:
            self.check_refusal(conversation, r)

    def check_refusal(self, conversation: Conversation, r: httpx.Response) -> None:
        if r.status_code == 404:  # a conversation this user was told exists
            self.soak.results.violation("lost", f"{self.marker}: {conversation.id} answered 404: {r.text[:200]}")
        elif r.status_code != 409 and "nothing_to_regenerate" not in r.text:  # a turn that failed saved no reply
            self.soak.results.violation("unexpected_4xx", f"{r.request.method} {r.request.url.path} {r.status_code} "
                                                          f"{r.text[:200]}")

    async def turn(self, loop: Loop) -> None:
        conversation = self.pick(loop)
        if conversation is None or conversation.turns >= MAX_TURNS:
            await self.create(loop)
            return
        conversation.turns += 1
        user_input = self.text()
        await self.stream(conversation, {"user_input": user_input, "conversation_id": conversation.id}, [user_input])

    async def regenerate(self, loop: Loop) -> None:
        conversation = self.pick(loop)
        if conversation is None or conversation.changes >= 3 or not conversation.texts:
            return
        conversation.changes += 1
        await self.stream(conversation, {"user_input": "", "regenerate": True,
                                         "conversation_id": conversation.id}, [])

    async def edit(self, loop: Loop) -> None:
        conversation = self.pick(loop)
        if conversation is None or conversation.changes >= 3 or not conversation.texts:
            return
        r = await self.request("GET", f"/conversations/{conversation.id}")
        if r is None or r.status_code != 200:
            return
        users = [i for i, m in enumerate(r.json()["messages"]) if m["role"] == "user"]
        if not users:
            return
        conversation.changes += 1
        user_input = self.text()
        await self.stream(conversation, {"user_input": user_input, "edit_index": self.rng.choice(users),
                                         "conversation_id": conversation.id}, [user_input])

    async def stream(self, conversation: Conversation, body: dict[str, Any], inputs: list[str]) -> None:
        style = self.rng.choices(("whole", "leave", "slow"), (75, 15, 10))[0]
        leave_after = self.rng.randint(0, 6)
        body["max_tokens"] = self.rng.randint(4, 40)
        results = self.soak.results
        reply, end, events = "", "", 0
        url = self.url("/chat_stream")
        try:
            async with self.client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.soak.judge_status("POST /chat_stream", r)
                    if r.status_code < 500:
                        self.check_refusal(conversation, r)
                    return
                self.soak.judge_status("POST /chat_stream", r)
                event = ""
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        events += 1
                        if event == "delta":
                            reply += data["text"]
                        elif event == "done":
                            end = "done"
                        elif event == "error":
                            end = f"error:{data['error']}"
                    if style == "leave" and events >= leave_after and not end:
                        end = "left"
                        break
                    if style == "slow":
                        await asyncio.sleep(self.rng.uniform(0.05, 0.25))
        except httpx.HTTPError as exc:
            self.soak.transport_error("POST /chat_stream", url, exc)
            return
        self.check_markers("/chat_stream", reply)
        results.stream_ends[end or "no_end"] += 1
        if self.soak.active is not None:
            results.during_faults[f"{self.soak.active[0]}: /chat_stream {end or 'no_end'}"] += 1
        if end == "done":
            conversation.texts.extend([*inputs, reply])
            results.acknowledged["turns"] += 1
        elif end.startswith("error:"):
            self.soak.judge_stream_error(end[6:])
        elif end != "left":
            results.violation("bad_stream_end", f"a /chat_stream reply ended with neither done nor error "
                                                f"({events} events)")

    async def v1(self, loop: Loop) -> None:
        body = {"model": "soak", "messages": [{"role": "user", "content": self.text()}],
                "max_tokens": self.rng.randint(4, 24), "user": self.marker, "stream": self.rng.random() < 0.5}
        r = await self.request("POST", "/v1/chat/completions", json=body)
        if r is not None and r.status_code == 200:
            finished = "[DONE]" in r.text if body["stream"] else bool(r.json()["choices"][0]["finish_reason"])
            if not finished:
                self.soak.results.violation("bad_stream_end", "a /v1 reply without its end")

    async def read(self, loop: Loop) -> None:
        conversation = self.pick(loop)
        kind = self.rng.choice(("list", "history", "conversation"))
        if kind == "list" or conversation is None:
            await self.request("GET", "/conversations")
            return
        path = (f"/history?conversation_id={conversation.id}" if kind == "history"
                else f"/conversations/{conversation.id}")
        r = await self.request("GET", path)
        if r is not None and r.status_code == 200:
            self.soak.check_conversation(self, conversation, r.json()["messages"], "over HTTP while running")
        elif r is not None and r.status_code < 500:
            self.check_refusal(conversation, r)


def texts_in(messages: list[dict[str, Any]]) -> set[str]:
    """Every version of every message: contents, earlier answers, the branches edits replaced."""
    found: set[str] = set()
    for message in messages:
        found.add(message.get("content", ""))
        found.update(message.get("alternatives") or [])
        for branch in message.get("branches") or []:
            found |= texts_in(branch)
    return found


# -- the run -------------------------------------------------------------------------------------------

class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.faults = config.faults or FAULTS[config.store]
        self.results = Results(config={**asdict(config), "faults": list(self.faults)})
        self.windows: list[tuple[str, float, float]] = []  # (fault, start, end) in monotonic time
        self.active: tuple[str, float] | None = None
        self.rng = random.Random(config.seed)
        self.users: list[User] = []
        self.samples: list[list[tuple[float, float, int]]] = []

    # -- judging answers --

    def in_fault(self, kind: str | None = None) -> bool:
        now = time.monotonic()
        if self.active is not None and (kind is None or self.active[0] == kind):
            return True
        return any(start <= now <= end + GRACE_S for k, start, end in self.windows if kind is None or k == kind)

    def judge_status(self, name: str, r: httpx.Response) -> None:
        code = ""
        if r.status_code >= 400:
            with contextlib.suppress(Exception):
                code = json.loads(r.content).get("error", "")
            code = code if isinstance(code, str) else "error"
        answer = f"{name} {r.status_code}{' ' + code if code else ''}"
        self.results.statuses[answer] += 1
        if self.active is not None:
            self.results.during_faults[f"{self.active[0]}: {answer}"] += 1
        if r.status_code < 500 or r.status_code == 503:
            return
        if r.status_code == 507 and code == "store_full" and self.in_fault("disk_full") and \
                not name.startswith("DELETE"):  # deleting is how a user frees room: it must work when full
            return
        self.results.violation("bad_5xx", f"{name} answered {r.status_code}: {r.text[:200]}")

    def judge_stream_error(self, code: str) -> None:
        if code in STORE_ERRORS or (code == "store_full" and self.in_fault("disk_full")):
            return
        self.results.violation("bad_stream_end", f"a /chat_stream reply ended with error {code}")

    def transport_error(self, name: str, url: str, exc: Exception) -> None:
        self.results.statuses[f"{name} {type(exc).__name__}"] += 1
        at = time.monotonic() - self.started
        faults = [f"{k} {s - self.started:.1f}-{e - self.started:.1f}" for k, s, e in self.windows]
        self.results.violation("transport", f"{name} to {url} at {at:.1f} s: {type(exc).__name__} {exc} "
                                            f"(faults so far: {faults[-2:]}, now: {self.active})")

    def check_conversation(self, user: User, conversation: Conversation, messages: list[dict[str, Any]],
                           where: str) -> None:
        stored = texts_in(messages)
        for text in conversation.texts:
            self.results.verified["texts"] += 1
            if text not in stored:
                self.results.violation("lost", f"{user.marker}: acknowledged {text[:60]!r} missing from "
                                               f"{conversation.id} ({where})")

    # -- faults and samples --

    async def inject_faults(self, servers: Servers, store: Store, deadline: float) -> None:
        """Faults in turn, each over before the deadline (so none is cut short)."""
        n = 0
        while True:
            at = self.started + (n + 1) * self.config.fault_every_s
            if at + self.config.lease_s * 6 > deadline:
                return
            await asyncio.sleep(at - time.monotonic())
            kind = self.faults[n % len(self.faults)]
            n += 1
            start = time.monotonic()
            self.active = (kind, start)
            detail = await asyncio.to_thread(self.fault, kind, servers, store)
            end = time.monotonic()
            self.windows.append((kind, start, end))
            self.active = None
            self.results.faults.append({"fault": kind, "at_s": round(start - self.started, 1),
                                        "lasted_s": round(end - start, 1), **detail})

    def fault(self, kind: str, servers: Servers, store: Store) -> dict[str, Any]:
        stall = self.config.lease_s * 2.5
        if kind == "sigstop":
            victim = self.rng.randrange(len(servers.procs))
            servers.procs[victim].send_signal(signal.SIGSTOP)
            time.sleep(stall)
            servers.procs[victim].send_signal(signal.SIGCONT)
            return {"process": victim}
        if kind == "disk_full":
            store.fill_disk()
            assert store.mounted is not None
            free = shutil.disk_usage(store.mounted).free
            time.sleep(stall * 2)
            store.empty_disk()
            return {"free_bytes_while_full": free}
        if kind == "redis_kill":
            store.kill_redis()
            time.sleep(stall)
            store.start_redis()
            return {}
        if kind == "redis_pause":
            import redis

            admin = redis.Redis(port=store.port)
            try:
                admin.client_pause(int(stall * 1000))
                time.sleep(stall)
            finally:
                admin.close()
            return {}
        raise ValueError(f"unknown fault {kind!r}")

    async def sample_processes(self, servers: Servers, stop: asyncio.Event) -> None:
        self.samples = [[] for _ in servers.procs]
        while True:
            self.take_sample(servers)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.sample_every_s)
                return

    def take_sample(self, servers: Servers) -> None:
        for series, proc in zip(self.samples, servers.procs):
            with contextlib.suppress(OSError):
                series.append((time.monotonic() - self.started, *sample(proc.pid)))

    # -- the end --

    async def verify(self, servers: Servers, store: Store) -> None:
        results = self.results
        contents = await asyncio.to_thread(store.contents)
        by_session: dict[str, set[str]] = {}
        for key, data in contents.items():
            by_session.setdefault(key.split("/")[0], set()).update(MARKER.findall(data))
        for session, markers in by_session.items():
            results.verified["stored_sessions"] += 1
            if len(markers) > 1:
                results.violation("cross_user", f"stored session {session[:8]} holds {sorted(markers)}")
        owner = {next(iter(m)): s for s, m in by_session.items() if len(m) == 1}
        for user in self.users:
            r = await user.request("GET", "/conversations")
            if r is None or r.status_code != 200:
                results.violation("lost", f"{user.marker}: GET /conversations answered "
                                          f"{r.status_code if r is not None else 'nothing'} at the end")
                continue
            listed = {c["id"]: c["title"] for c in r.json()["conversations"]}
            known = [c for loop in user.loops for c in loop.conversations.values()]
            for gone in user.deleted & set(listed):
                results.violation("lost", f"{user.marker}: deleted {gone} (200) is listed again")
            unknown = set(listed) - {c.id for c in known}
            if len(unknown) > user.unsure_creates:
                results.violation("lost", f"{user.marker}: {len(unknown)} conversations nobody made")
            session = owner.get(user.marker)
            for conversation in known:
                results.verified["conversations"] += 1
                if conversation.id not in listed:
                    if not conversation.may_be_gone:
                        results.violation("lost", f"{user.marker}: conversation {conversation.id} is not listed")
                    continue
                if listed[conversation.id] not in conversation.titles:
                    results.violation("lost", f"{user.marker}: {conversation.id} is titled "
                                              f"{listed[conversation.id]!r}, not {sorted(conversation.titles)}")
                r = await user.request("GET", f"/conversations/{conversation.id}")
                if r is None or r.status_code != 200:
                    results.violation("lost", f"{user.marker}: {conversation.id} answered "
                                              f"{r.status_code if r is not None else 'nothing'}")
                    continue
                self.check_conversation(user, conversation, r.json()["messages"], "over HTTP at the end")
                stored = contents.get(f"{session}/{conversation.id}", "") if session else ""
                for text in conversation.texts:  # the same, read from the store itself
                    results.verified["texts_in_store"] += 1
                    if json.dumps(text, ensure_ascii=False)[1:-1] not in stored:
                        results.violation("lost", f"{user.marker}: acknowledged {text[:60]!r} is not in the "
                                                  f"store under {conversation.id}")

    def judge_processes(self, servers: Servers, quiet: list[tuple[float, int]]) -> None:
        warm_until = max(self.config.duration_s * 0.2, self.config.sample_every_s * 2)
        for n, (series, proc) in enumerate(zip(self.samples, servers.procs)):
            if proc.poll() is not None:
                self.results.violation("transport", f"server {n} exited with {proc.returncode}")
            if not series:
                continue
            rss = [s[1] for s in series]
            fds = [s[2] for s in series]
            warm = max(s[1] for s in series if s[0] <= warm_until)
            final_rss, final_fds = quiet[n]
            self.results.processes.append({
                "process": n, "samples": len(series), "rss_mib": {"first": round(rss[0], 1), "warm": round(warm, 1),
                                                                  "last": round(final_rss, 1), "max": round(max(rss), 1)},
                "fds": {"first": fds[0], "last": final_fds, "max": max(fds)}})
            if final_rss > warm + self.config.max_rss_growth_mib:
                self.results.violation("leak", f"server {n}: RSS {warm:.0f} MiB after warm-up, {final_rss:.0f} at the end")
            if final_fds > fds[0] + self.config.max_fd_growth:
                self.results.violation("leak", f"server {n}: {fds[0]} descriptors at the start, {final_fds} at the end")

    async def run(self) -> Results:
        config = self.config
        workdir = Path(config.workdir or tempfile.mkdtemp(prefix="chatstream-soak-"))
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        store = await asyncio.to_thread(Store, config.store, workdir, config.disk_mib)
        if "disk_full" in self.faults and store.mounted is None:
            self.faults = tuple(f for f in self.faults if f != "disk_full") or ("sigstop",)
            self.results.config["faults"] = list(self.faults)
            self.results.config["note"] = "no tmpfs could be mounted (not root?): no disk_full faults"
        servers = await asyncio.to_thread(Servers, config, store, workdir)
        self.servers = servers
        try:
            await asyncio.to_thread(servers.wait_healthy)
            self.started = time.monotonic()
            deadline = self.started + config.duration_s
            self.users = [User(self, n) for n in range(config.clients)]
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sample_processes(servers, stop))
            faults = asyncio.create_task(self.inject_faults(servers, store, deadline))
            await asyncio.gather(*(user.run(deadline) for user in self.users))
            await faults
            await asyncio.to_thread(servers.wait_healthy)
            await asyncio.sleep(config.lease_s + 1)
            await self.verify(servers, store)
            for user in self.users:
                await user.client.aclose()
            stop.set()
            await sampler
            await asyncio.sleep(6)  # past the servers' keep-alive: their client connections are closed
            quiet = []
            for proc in servers.procs:
                try:
                    quiet.append(sample(proc.pid))
                except OSError:
                    quiet.append((0.0, 0))
            self.judge_processes(servers, quiet)
            self.results.wall_s = round(time.monotonic() - self.started, 1)
        finally:
            servers.close()
            store.close()
            if config.workdir is None and not self.results.violations:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                self.results.config["workdir"] = str(workdir)  # the servers' logs, to read
        return self.results


def summary(results: Results) -> str:
    lines = [f"soak: {results.config['store']} store, {results.config['processes']} processes, "
             f"{results.config['clients']} clients, {results.config['engine']} engine, {results.wall_s} s"]
    lines.append("faults: " + (", ".join(
        f"{f['fault']} at {f['at_s']} s for {f['lasted_s']} s" + "".join(f", {k} {v}" for k, v in f.items()
                                                                     if k not in ("fault", "at_s", "lasted_s"))
        for f in results.faults) or "none"))
    for kind in dict.fromkeys(f["fault"] for f in results.faults):
        seen = Counter({k.split(": ", 1)[1]: v for k, v in results.during_faults.items() if k.startswith(kind + ":")})
        lines.append(f"during {kind}: " + ", ".join(f"{k} {v}" for k, v in seen.most_common(12)))
    lines.append("actions: " + ", ".join(f"{k} {v}" for k, v in sorted(results.actions.items())))
    lines.append("acknowledged: " + ", ".join(f"{k} {v}" for k, v in sorted(results.acknowledged.items())))
    lines.append("verified: " + ", ".join(f"{k} {v}" for k, v in sorted(results.verified.items())))
    lines.append("stream ends: " + ", ".join(f"{k} {v}" for k, v in results.stream_ends.most_common()))
    errors = Counter({k: v for k, v in results.statuses.items() if not re.search(r" [23]\d\d$", k)})
    lines.append("non-2xx answers: " + (", ".join(f"{k}: {v}" for k, v in errors.most_common()) or "none"))
    for p in results.processes:
        lines.append(f"server {p['process']}: RSS MiB first/warm/last/max {p['rss_mib']['first']}/"
                     f"{p['rss_mib']['warm']}/{p['rss_mib']['last']}/{p['rss_mib']['max']}, descriptors "
                     f"first/last/max {p['fds']['first']}/{p['fds']['last']}/{p['fds']['max']} ({p['samples']} samples)")
    kinds = ("lost", "cross_user", "bad_5xx", "bad_stream_end", "transport", "leak", "unexpected_4xx")
    lines.append("violations: " + ", ".join(f"{k} {results.violations.get(k, 0)}" for k in kinds))
    lines.extend(f"  {example}" for example in results.examples)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic (default 1200)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--engine", choices=("mock", "model"), default="mock",
                        help="mock: canned text; model: the embedded default model")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (default 30)")
    parser.add_argument("--faults", default="", help="comma-separated, in turn (default: every kind for the store)")
    parser.add_argument("--lease-s", type=float, default=2.0, help="the servers' --session-lease-s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the store and the servers' logs here")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - set(FAULTS[args.store])
    if unknown:
        parser.error(f"--faults: {sorted(unknown)} are not faults of the {args.store} store ({FAULTS[args.store]})")
    config = SoakConfig(duration_s=args.duration, store=args.store, engine=args.engine, processes=args.processes,
                        clients=args.clients, fault_every_s=args.fault_every, faults=faults, lease_s=args.lease_s,
                        seed=args.seed, workdir=args.workdir)
    # SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C, so the servers and redis-server it
    # started are stopped by their finally blocks instead of being left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = asyncio.run(Soak(config).run())
    print(summary(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(vars(results), indent=1))
    return 1 if results.violations else 0


if __name__ == "__main__":
    sys.exit(main())
