"""Settings: one frozen model, read from the environment only at the edge (``from_env``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import ConfigurationError
from orchestrator.safety import escape, short
from orchestrator.storage.urls import DEFAULT_DATABASE_URL

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")
ENV_PREFIX = "SAGA_"


class Settings(BaseSettings):
    """How an orchestrator and its workers run; every field has a working default.

    From the environment, each field is ``SAGA_<FIELD>`` (e.g. ``SAGA_DATABASE_URL``).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    """``sqlite:///path`` (default ``sqlite:///sagaworks.db``), ``postgresql://...`` or ``memory://``."""
    lease_seconds: float = Field(default=30.0, gt=0)
    """How long a worker owns an attempt before another may take it over; renewed while it runs."""
    poll_interval: float = Field(default=0.5, gt=0)
    """Longest sleep of an idle worker between looks for due work (wake-ups usually come sooner)."""
    concurrency: int = Field(default=128, ge=1)
    """Attempts a worker runs at once (threads for ``def`` steps, one event loop for ``async def``)."""
    batch_size: int = Field(default=128, ge=1)
    """Sagas a worker claims and records per transaction."""
    shutdown_grace: float = Field(default=30.0, ge=0)
    """Seconds a stopping worker waits for the attempts in hand before it leaves them to their leases."""
    max_input_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest saga input, event payload or step output, in bytes of JSON (default 1 MiB)."""
    api_token: SecretStr | None = None
    """Bearer token the HTTP API and dashboard require for every change (start, send, cancel, retry)."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest HTTP request body the API reads (default 1 MiB); larger ones are refused with 413."""
    notify_secret: SecretStr | None = None
    """Key of the HMAC-SHA256 signature on completion notifications (``Sagaworks-Signature``)."""
    log_json: bool | None = None
    """JSON logs (default: when stderr is not a terminal)."""
    log_level: LogLevel = "info"
    """The lowest level logged: debug, info, warning, error or critical."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from ``SAGA_*`` environment variables; a bad value names its variable."""
        try:
            return cls()
        except ValidationError as error:
            first = error.errors()[0]
            variable = ENV_PREFIX + "_".join(str(part) for part in first["loc"]).upper()
            value = first.get("input")
            raise ConfigurationError(
                f"{variable}={escape(short(value, 40)) if isinstance(value, str) else '…'}: {first['msg']}"
            ) from None

    @classmethod
    def defaults(cls) -> Settings:
        """Settings that ignore the environment."""
        return cls.model_construct()
