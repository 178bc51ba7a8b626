"""One typed settings object shared by the CLI, the server and the library.

Every field can be set from the environment as ``CHATSTREAM_<NAME>`` (e.g. ``CHATSTREAM_PORT``)
and, for ``chatstream serve``, as ``--<name>`` (the CLI is generated from these fields).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATSTREAM_", extra="ignore", validate_assignment=True)

    # -- server --
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    log_level: str = Field("info", pattern="^(?i:critical|error|warning|info|debug|trace)$",
                           description="log level")

    # -- model and engine --
    model: str | None = Field(None, description="local Hugging Face model folder, .gguf file or installed model package name (none: the embedded SmolLM2-135M-Instruct)")
    tool_call_parser: str = Field("auto", pattern="^(auto|hermes|llama3_json|mistral)$", description="how /v1 finds tool calls in a reply: auto (from the chat template), hermes (<tool_call>), llama3_json, mistral ([TOOL_CALLS])")
    served_model_name: str | None = Field(None, description="comma-separated model names /v1 accepts (none: any name, like llama.cpp's server); the first is the name /v1/models shows")
    mock: bool = Field(False, description="stream canned text without a model")
    mock_token_delay: float = Field(0.03, ge=0.0, le=10.0, description="seconds between mock tokens")
    device: str = Field("cpu", description="torch device: cpu or cuda")
    kv_cache_mb: int | None = Field(None, ge=1, description="KV-cache memory budget in MiB (none: concurrency x context plus 50% for cached prefixes, at most a quarter of available memory)")
    quantization: str = Field("auto", pattern="^(auto|int8|none)$", description="auto: int8 linear layers for a float32 model on CPU; int8; none (the model's own precision)")
    gguf_weights: str = Field("auto", pattern="^(auto|stored|float)$", description="a quantized GGUF model on CPU: stored keeps its weights as stored (about the file's size in memory); float converts them once to float32 (then int8 linears, 5-8x the memory); auto: stored")
    kernels: str = Field("auto", pattern="^(auto|native|torch)$", description="auto: chatstream's C kernels (built at first use with the machine's C compiler) for a float32 Llama-family model on CPU when they build and pass a check, else PyTorch's operators; native: require them; torch: PyTorch's operators only")
    kv_cache_dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$", description="the KV cache's element type; bfloat16 and float16 take half the bytes a token of float32 (twice the context in the same --kv-cache-mb). auto: the model's dtype (a 16-bit cache did not measure faster on CPU: it is for memory)")
    prefix_caching: bool = Field(True, description="keep KV blocks of finished requests to reuse for prompts that start the same way")
    shared_prefix_cache: bool = Field(False, description="share cached prompt prefixes across users (a long shared system prompt is computed once), which lets any client confirm text another user sent by timing; off: a user's requests reuse only their own")
    dtype: str | None = Field(None, pattern="^(float32|bfloat16|float16)$", description="weights' dtype (none: float32 on CPU, bfloat16 on CUDA)")
    threads: int | None = Field(None, ge=1, le=1024, description="threads for the engine (torch's and the native kernels' pool; none: on CPU every usable core where GGUF blocks run the products, else every core but one, which the event loop keeps)")
    forward_lanes: int = Field(1, ge=1, le=64, description="threads that share one engine step on CPU, each over its own share of the batch (same tokens either way; 2 uses a second core, which pays only where one is free)")

    # -- remote engines --
    engine_url: Annotated[list[str], NoDecode] = Field(default_factory=list, description="generate on this OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, another chatstream) instead of a local model; repeat for several (env: comma-separated)")
    engine_api_key: str | None = Field(None, description="API key sent to the --engine-url servers")
    engine_model: str | None = Field(None, description="model name sent to the --engine-url servers (none: the first id of each one's /v1/models)")
    engine_health_interval_s: float = Field(5.0, gt=0, le=3600, description="seconds between health checks of the --engine-url servers")
    tokenizer: str | None = Field(None, description="with --engine-url: a local Hugging Face folder or .gguf file whose tokenizer counts tokens for truncation (none: the upstream's /tokenize, else an estimate)")

    # -- load control --
    concurrency: int = Field(2, ge=1, le=1024, description="generations that run at once (the seed API's num_of_concurrent_executions)")
    queue_size: int = Field(5, ge=0, le=100_000, description="requests that may wait for a slot (the seed API's max_queue_size)")
    queue_timeout_s: float = Field(300.0, gt=0, description="longest wait in the queue before a request ends with a queue_timeout error")
    stall_timeout_s: float = Field(60.0, gt=0, description="a generation that produces nothing for this long ends with an error and frees its slot")
    drain_timeout_s: float = Field(20.0, ge=0, description="on shutdown, how long running replies may finish before they are ended (partial replies are saved)")

    # -- generation defaults and limits --
    max_new_tokens: int = Field(256, ge=1, le=1 << 20, description="longest reply in tokens (larger max_tokens requests are clamped)")
    context_len: int | None = Field(None, ge=16, le=1 << 22, description="prompt + reply token budget; oldest turns are dropped to fit (none: what the model supports, capped by the KV-cache budget; the mock: 4096)")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="default sampling temperature; 0 = greedy")
    top_k: int = Field(50, ge=0, le=1 << 31, description="default top-k; 0 = off")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="default top-p; 1 = off")
    repetition_penalty: float = Field(1.05, gt=0.0, le=10.0, description="default repetition penalty; 1 = off")
    system_prompt: str | None = Field(None, description="system message for new conversations")
    max_input_chars: int | None = Field(None, ge=1, le=10_000_000, description="largest accepted user message in characters, a cheap bound checked before its tokens are counted (none: 16 per token of the context); a message whose tokens do not fit the context with the reply is refused either way")
    max_history_messages: int = Field(1000, ge=2, le=100_000, description="messages a stored conversation may hold; beyond it a new turn is refused until the conversation is cleared")
    max_messages: int = Field(1000, ge=1, le=100_000, description="messages an OpenAI request may carry")

    # -- sessions and security --
    session_store: str | None = Field(None, description="where sessions live: memory://, sqlite:// (sessions.db in the data folder), sqlite:///path.db, redis://host:port/db (none: sqlite:// for chatstream serve, memory:// in a library)")
    data_dir: str | None = Field(None, description="folder for the sessions database and the session secret (none: $XDG_DATA_HOME/chatstream or ~/.local/share/chatstream)")
    session_secret: str | None = Field(None, description="secret that signs session cookies (none: generated once and kept in the data folder by chatstream serve; required with Redis)")
    new_sessions_per_minute: int = Field(60, ge=0, description="new sessions one client address may start per minute (0 = no limit)")
    session_ttl_s: int = Field(14 * 24 * 3600, ge=60, description="session lifetime in seconds")
    session_max_bytes: int = Field(64 * 2**20, ge=4096, description="most bytes one session may hold (its index and all its conversations, as JSON), in bytes: a change that grows it beyond is refused with 413 session_too_large; shrinking always works")
    session_store_max_bytes: int | None = Field(None, ge=2**20, description="most bytes the session store may hold: the SQLite file, the bytes chatstream counts in Redis (beside its maxmemory), or the memory store's values; a write that grows it beyond is refused with 507 store_full while deletes still work (none: the disk, maxmemory, or the memory store's session count)")
    session_lease_s: float = Field(5.0, gt=0.1, le=3600, description="a conversation's lock is a lease renewed while a reply is written: a crashed or stalled holder frees it after this long, and its writes are then refused")
    secure_cookies: bool = Field(False, description="mark cookies Secure (HTTPS only)")
    api_key: str | None = Field(None, description="if set, every route but /health and /health/live requires it: 'Authorization: Bearer <key>', or the UI's sign-in")
    auth_cookie_max_age_s: int = Field(7 * 24 * 3600, ge=60, description="how long the UI's sign-in lasts, in seconds")
    allowed_origins: str = Field("", description="comma-separated origins (https://host:port) besides the server's own that may send cookie-authenticated POSTs")
    forwarded_allow_ips: str = Field("127.0.0.1,::1", description="comma-separated addresses or networks of reverse proxies (or *) whose X-Forwarded-For and X-Forwarded-Proto are believed: the client address for the per-address limits, the scheme for the origin check")
    cors_origins: str = Field("", description="comma-separated origins (https://host:port, or *) whose browser apps may call the API with a key: CORS headers and OPTIONS preflights (never with cookies)")
    docs: bool = Field(False, description="serve the OpenAPI docs at /docs, /redoc and /openapi.json")

    # -- HTTP limits and timeouts --
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body, in bytes (413 beyond)")
    body_timeout_s: float = Field(15.0, gt=0, description="a request body that stops arriving for this long is answered 408")
    body_linger_s: float = Field(5.0, ge=0, le=300, description="after an early answer (413, 401, 403) to a request whose body is still arriving, read and discard the rest for at most this long, so that the client reads the answer instead of a connection reset (0: close at once)")
    body_linger_bytes: int = Field(128 * 2**20, ge=0, description="read and discard at most this much of a refused body (a declared larger rest: close at once)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must finish its request headers this fast, else it is closed")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this long")
    max_connections: int | None = Field(None, ge=1, description="open connections at most; more get 503 at once (none: from the file-descriptor limit, at most 4096)")

    @field_validator("allowed_origins")
    @classmethod
    def _origins_parse(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"not an origin: {origin!r} (expected e.g. https://chat.example.com)")
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies_parse(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",") if e.strip()):
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"not an address or network: {entry!r} (expected e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return value

    @field_validator("engine_url", mode="before")
    @classmethod
    def _engine_urls_parse(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: a JSON list or comma-separated
            value = json.loads(value) if value.strip().startswith("[") else [u for u in value.split(",") if u.strip()]
        return value

    @field_validator("engine_url")
    @classmethod
    def _engine_urls_check(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:8001)")
        return [url.strip() for url in value]

    @property
    def resolved_data_dir(self) -> Path:
        from .session.data_dir import default_data_dir

        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()

    @model_validator(mode="after")
    def _reply_fits_context(self) -> Settings:
        if self.context_len is not None and self.max_new_tokens >= self.context_len:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be smaller than context_len ({self.context_len})")
        if self.engine_url and (self.mock or self.model):
            raise ValueError("--engine-url generates on other servers: it excludes --mock and --model")
        if self.tokenizer and not self.engine_url:
            raise ValueError("--tokenizer is for --engine-url (a local model brings its own tokenizer)")
        return self
