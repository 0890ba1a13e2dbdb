"""Settings: one frozen model, read from the environment only at the edge (``from_env``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.store import DEFAULT_DATABASE_URL


class Settings(BaseSettings):
    """How an orchestrator and its workers run; every field has a working default.

    From the environment, each field is ``SAGA_<FIELD>`` (e.g. ``SAGA_DATABASE_URL``).
    """

    model_config = SettingsConfigDict(env_prefix="SAGA_", frozen=True, extra="ignore")

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
    log_json: bool | None = None
    """JSON logs (default: when stderr is not a terminal)."""
    log_level: str = "info"
    """The lowest level logged."""

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from ``SAGA_*`` environment variables."""
        return cls()

    @classmethod
    def defaults(cls) -> Settings:
        """Settings that ignore the environment."""
        return cls.model_construct()
