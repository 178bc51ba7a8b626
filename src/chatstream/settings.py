"""One typed settings object shared by the CLI, the server and the library.

Every field can be set from the environment as ``CHATSTREAM_<NAME>`` (e.g. ``CHATSTREAM_PORT``).
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATSTREAM_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model: str | None = Field(None, description="local Hugging Face model folder or .gguf file; default: embedded SmolLM2-135M-Instruct")
    mock: bool = Field(False, description="stream canned text without a model")
    device: str = Field("cpu", description="torch device: cpu or cuda")
    concurrency: int = Field(2, ge=1, le=1024, description="generations that run at once (num_of_concurrent_executions)")
    queue_size: int = Field(5, ge=0, le=100_000, description="requests that may wait for a slot (max_queue_size)")
    max_new_tokens: int = Field(256, ge=1, description="longest reply in tokens")
    context_len: int = Field(1024, ge=16, description="prompt + reply token budget; oldest turns are dropped to fit")
    kv_cache_mb: int | None = Field(None, ge=1, description="KV-cache memory budget in MiB (default: from free memory)")
    temperature: float = Field(0.7, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(50, ge=0, description="0 = off")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="1 = off")
    repetition_penalty: float = Field(1.05, gt=0.0, description="1 = off")
    system_prompt: str | None = Field(None, description="system message for new conversations")
    max_input_chars: int = Field(8000, ge=1, description="largest accepted user_input, in characters")
    session_secret: str | None = Field(None, description="secret that signs session cookies (random per process if unset)")
    session_ttl_s: int = Field(14 * 24 * 3600, ge=60, description="session lifetime in seconds")
    secure_cookies: bool = Field(False, description="mark the session cookie Secure (HTTPS only)")
    api_key: str | None = Field(None, description="if set, /v1/* requires 'Authorization: Bearer <key>'")
    mock_token_delay: float = Field(0.03, ge=0.0, description="seconds between mock tokens")
    log_level: str = Field("info", description="uvicorn/chatstream log level")
