"""Process settings, read from ``TIERQ_*`` environment variables (12-factor)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path("var")
KIB = 1024
MIB = 1024 * KIB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIERQ_", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="Folder for the zero-install default's files.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means SQLite under TIERQ_HOME."
    )
    broker_url: str = Field(
        "",
        description="Celery broker URL; empty: a folder broker (kombu filesystem) under home.",
    )
    config: Path | None = Field(None, description="Tier configuration YAML; empty: built-in.")

    lease_seconds: float = Field(30.0, gt=0, description="How long a claim lasts unrenewed.")
    max_deliveries: int = Field(
        5,
        ge=1,
        description="A job whose worker died (its lease ran out) this many times is dead: "
        "a poison job. Retries, escalations and replays do not count.",
    )
    relay_interval: float = Field(1.0, gt=0, description="Seconds between relay sweeps.")
    republish_after: float = Field(
        30.0, gt=0, description="A queued job untouched this long is published again."
    )
    visibility_timeout: int = Field(
        3600, gt=0, description="Redis transport: seconds before an unacked message returns."
    )
    long_poll_max: float = Field(60.0, gt=0)
    shutdown_grace: float = Field(
        10.0,
        gt=2,
        description="Seconds a stopping worker (SIGTERM) gives its calls before it stops the "
        "ones still in flight (2 s before it ends) and hands their jobs back.",
    )
    db_pool_size: int = Field(
        10, ge=1, description="Database connections a process keeps open (Postgres)."
    )
    db_max_overflow: int = Field(
        20, ge=0, description="Connections a process may open beyond db_pool_size under load."
    )
    chat_wait_seconds: float = Field(
        60.0,
        ge=0,
        description="/v1/chat/completions waits this long for the answer before a retryable "
        "error naming the job.",
    )
    stream_url: str = Field(
        "", description="Redis for live token streams; empty: the broker's Redis, if it is one."
    )
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # Request limits (api/limits.py, api/schemas.py, `tierq api`): hostile input is refused
    # before it costs memory, a database row or a key lookup. Defaults and why: README.
    max_body_bytes: int = Field(
        8 * MIB,
        ge=1024,
        description="A larger request body is refused (413) by Content-Length or while it "
        "streams in, before it is parsed or its key is checked.",
    )
    max_job_bytes: int = Field(
        8 * MIB,
        ge=1024,
        description="A job whose messages and parameters take more as stored (UTF-8 JSON) "
        "is refused (422 naming body).",
    )
    max_messages: int = Field(1000, ge=1, description="Messages one request may carry.")
    max_header_bytes: int = Field(
        16 * KIB,
        ge=1024,
        description="Request line and headers together; more is refused (431). uvicorn "
        "(h11) stops buffering headers past it too (400).",
    )
    body_timeout: float = Field(
        60.0, gt=0, description="Seconds a client has to send its whole body (else 408)."
    )
    api_keep_alive: int = Field(
        75,
        ge=1,
        description="Idle seconds a client connection is kept between requests; above a "
        "load balancer's idle timeout, so it never reuses a connection we just closed.",
    )
    # Per-key limits (api/key_limits.py): defaults for keys without their own (`tierq keys
    # create --rps --max-jobs --max-waiters`); 0 means no limit. Over one: 429, Retry-After.
    key_rps: float = Field(
        100.0,
        ge=0,
        description="Requests per second of one key, per API process (bursts "
        "of two seconds' worth).",
    )
    key_max_jobs: int = Field(
        10_000,
        ge=0,
        description="Jobs of one key not ended at once (queued, running, "
        "waiting to retry, parked); a submit past it is refused.",
    )
    key_max_waiters: int = Field(
        200,
        ge=0,
        description="Long-polls, event streams and waiting chat calls of one "
        "key at once, per API process.",
    )
    admin_key: str = Field("", description="Key with operator rights; empty disables admin.")
    crash_at: str = Field(
        "", description="Test hook: exit the process hard at the named crash point."
    )

    # What the API shows, and to whom. Secrets are SecretStr: never in a repr or a log line.
    production: bool = Field(False, description="Serve no /docs and no /redoc pages.")
    metrics_key: SecretStr = Field(
        SecretStr(""), description="When set, GET /metrics needs 'Authorization: Bearer <it>'."
    )
    secret: SecretStr = Field(
        SecretStr(""),
        description="Signs watch tokens; never stored beside the keys. Empty: generated once "
        "into TIERQ_HOME/secret (mode 0600). Set it when API processes do not share one home.",
    )
    secret_previous: SecretStr = Field(
        SecretStr(""), description="The secret before TIERQ_SECRET: accepted while rotating."
    )

    @field_validator("secret", "secret_previous")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'tierq.db').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "atomicfs://"  # tierq.folder_transport

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
