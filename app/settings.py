"""Settings read once from the environment.

Every setting has one environment variable. A missing or malformed one stops
start-up with a `SettingsError` that names the variable, so an operator sees
`DATABASE_URL: ...` instead of a stack trace from deep inside a driver.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
MIN_HMAC_SECRET_LENGTH = 32
MIN_SERVICE_TOKEN_LENGTH = 16
MIN_METRICS_TOKEN_LENGTH = 16
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://")
# Celery's RabbitMQ transports; the pub/sub and rate limits still need Redis (REDIS_URL).
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseModel):
    """The process configuration. Build it with `load_settings`, which reads the
    environment in one place, so a test passing its own mapping sees nothing else."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    database_url: str = Field(validation_alias=_env("DATABASE_URL"))
    redis_url: str = Field(validation_alias=_env("REDIS_URL"))
    broker_url: str | None = Field(default=None, validation_alias=_env("SWITCHBOARD_BROKER_URL"))
    port: int = Field(default=8000, ge=1, le=65535, validation_alias=_env("PORT"))
    policy: str = Field(
        default="bookstore", min_length=1, validation_alias=_env("SWITCHBOARD_POLICY")
    )
    service_token: str = Field(
        repr=False,
        min_length=MIN_SERVICE_TOKEN_LENGTH,
        validation_alias=_env("SWITCHBOARD_SERVICE_TOKEN"),
    )
    jwt_secret: str | None = Field(
        default=None, repr=False, validation_alias=_env("SWITCHBOARD_JWT_SECRET")
    )
    jwt_public_key: str | None = Field(
        default=None, validation_alias=_env("SWITCHBOARD_JWT_PUBLIC_KEY")
    )
    jwt_algorithm: Literal[
        "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"
    ] = Field(default="HS256", validation_alias=_env("SWITCHBOARD_JWT_ALGORITHM"))
    jwt_issuer: str | None = Field(default=None, validation_alias=_env("SWITCHBOARD_JWT_ISSUER"))
    jwt_audience: str | None = Field(
        default=None, validation_alias=_env("SWITCHBOARD_JWT_AUDIENCE")
    )
    jwt_leeway_seconds: int = Field(
        default=10, ge=0, le=300, validation_alias=_env("SWITCHBOARD_JWT_LEEWAY_SECONDS")
    )
    db_pool_size: int = Field(
        default=10, ge=1, le=200, validation_alias=_env("SWITCHBOARD_DB_POOL_SIZE")
    )
    db_pool_timeout: float = Field(
        default=5.0, gt=0, le=60, validation_alias=_env("SWITCHBOARD_DB_POOL_TIMEOUT")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", validation_alias=_env("SWITCHBOARD_LOG_LEVEL")
    )
    task_visibility_timeout: int = Field(
        default=300, ge=30, le=86400, validation_alias=_env("SWITCHBOARD_TASK_VISIBILITY_TIMEOUT")
    )
    stream_max_sockets: int = Field(
        default=10_000, ge=1, le=1_000_000, validation_alias=_env("SWITCHBOARD_STREAM_MAX_SOCKETS")
    )
    stream_queue_size: int = Field(
        default=256, ge=1, le=100_000, validation_alias=_env("SWITCHBOARD_STREAM_QUEUE_SIZE")
    )
    stream_ping_interval: float = Field(
        default=25.0, gt=0, le=600, validation_alias=_env("SWITCHBOARD_STREAM_PING_INTERVAL")
    )
    stream_max_frame_bytes: int = Field(
        default=4096,
        ge=256,
        le=1_048_576,
        validation_alias=_env("SWITCHBOARD_STREAM_MAX_FRAME_BYTES"),
    )
    stream_send_buffer_bytes: int | None = Field(
        default=None,
        ge=1024,
        le=16_777_216,
        validation_alias=_env("SWITCHBOARD_STREAM_SEND_BUFFER_BYTES"),
    )
    stream_slow_consumer_grace: float = Field(
        default=5.0,
        gt=0,
        le=300,
        validation_alias=_env("SWITCHBOARD_STREAM_SLOW_CONSUMER_GRACE_SECONDS"),
    )
    worker_metrics_port: int | None = Field(
        default=None, ge=1, le=65535, validation_alias=_env("SWITCHBOARD_WORKER_METRICS_PORT")
    )
    worker_metrics_host: str = Field(
        default="0.0.0.0", min_length=1, validation_alias=_env("SWITCHBOARD_WORKER_METRICS_HOST")
    )
    metrics_token: str | None = Field(
        default=None,
        repr=False,
        min_length=MIN_METRICS_TOKEN_LENGTH,
        validation_alias=_env("SWITCHBOARD_METRICS_TOKEN"),
    )
    # Exact browser origins allowed to call the API; empty: no CORS headers at all.
    cors_origins: tuple[str, ...] = Field(
        default=(), validation_alias=_env("SWITCHBOARD_CORS_ORIGINS")
    )
    # Strict-Transport-Security on every response: only behind TLS.
    hsts: bool = Field(default=False, validation_alias=_env("SWITCHBOARD_HSTS"))
    # The browser client at /demo (app/demo): off unless asked for, since it is a showcase
    # rather than part of the API; `switchboard up` turns it on.
    demo: bool = Field(default=False, validation_alias=_env("SWITCHBOARD_DEMO"))
    # The policy's per-user rate limits; off for load tests and the test suite, whose
    # single users send faster than a person would.
    rate_limits_enabled: bool = Field(
        default=True, validation_alias=_env("SWITCHBOARD_RATE_LIMITS_ENABLED")
    )

    # Attachments: any S3-compatible store. No bucket: attachments are unavailable (a policy
    # that enables them is refused at start-up); `switchboard up` and the tests start an
    # embedded SeaweedFS instead. The AWS_* names are the standard ones; left unset,
    # boto3's own chain (an instance role, ~/.aws) supplies the credentials.
    s3_bucket: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$",
        validation_alias=_env("SWITCHBOARD_S3_BUCKET"),
    )
    # Unset for AWS; the store's URL for R2, MinIO, SeaweedFS (path-style addressing).
    s3_endpoint_url: str | None = Field(
        default=None, validation_alias=_env("SWITCHBOARD_S3_ENDPOINT_URL")
    )
    # Where clients reach the store when it is not the address the server uses (a
    # container network, a proxy): signed URLs are made for this one.
    s3_public_endpoint_url: str | None = Field(
        default=None, validation_alias=_env("SWITCHBOARD_S3_PUBLIC_ENDPOINT_URL")
    )
    aws_access_key_id: str | None = Field(
        default=None, repr=False, validation_alias=_env("AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: str | None = Field(
        default=None, repr=False, validation_alias=_env("AWS_SECRET_ACCESS_KEY")
    )
    aws_region: str = Field(
        default="us-east-1",
        pattern=r"^[a-z0-9-]{1,32}$",
        validation_alias=_env("AWS_REGION"),
    )
    # Lifetime of a presigned upload (POST) and of a signed download URL.
    s3_upload_ttl_seconds: int = Field(
        default=600, ge=30, le=86_400, validation_alias=_env("SWITCHBOARD_S3_UPLOAD_TTL_SECONDS")
    )
    s3_url_ttl_seconds: int = Field(
        default=300, ge=10, le=86_400, validation_alias=_env("SWITCHBOARD_S3_URL_TTL_SECONDS")
    )

    # Celery's "Task ... received" / "succeeded in" INFO lines, one pair per task: off by
    # default (at a few hundred messages a second they are most of a worker's log and a
    # measurable share of its CPU); task failures and retries are logged either way.
    task_log_lines: bool = Field(default=False, validation_alias=_env("SWITCHBOARD_TASK_LOG_LINES"))
    # Sends committed within this many milliseconds of a process's last enqueue share the
    # next task, while the process is busy (a quiet one enqueues each send at once); see
    # workers/send_batches.py.
    send_batch_window_ms: float = Field(
        default=20.0, ge=0, le=1000, validation_alias=_env("SWITCHBOARD_SEND_BATCH_WINDOW_MS")
    )
    send_batch_max: int = Field(
        default=100, ge=1, le=1000, validation_alias=_env("SWITCHBOARD_SEND_BATCH_MAX")
    )

    @field_validator("aws_region", mode="before")
    @classmethod
    def _empty_region_is_default(cls, value: object) -> object:
        return "us-east-1" if value == "" else value

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _check_endpoint_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError("must be an http:// or https:// URL of the S3 endpoint")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_s3_credentials(self) -> Settings:
        if bool(self.aws_access_key_id) != bool(self.aws_secret_access_key):
            raise SettingsError("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: set both or neither")
        return self

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(REDIS_SCHEMES + AMQP_SCHEMES):
            raise ValueError(
                "must be a Redis (redis://, rediss://, unix://) or RabbitMQ "
                "(amqp://, amqps://, pyamqp://) URL"
            )
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_cors_origins(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return tuple(check_origin(item.strip()) for item in value.split(",") if item.strip())

    @field_validator("hsts", "demo", mode="before")
    @classmethod
    def _empty_hsts_is_off(cls, value: object) -> object:
        return False if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_log_level(cls, value: object) -> object:
        # Operators write `debug` as often as `DEBUG`; both mean the same level.
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "jwt_secret",
        "jwt_public_key",
        "jwt_issuer",
        "jwt_audience",
        "broker_url",
        "worker_metrics_port",
        "stream_send_buffer_bytes",
        "metrics_token",
        "s3_bucket",
        "s3_endpoint_url",
        "s3_public_endpoint_url",
        "aws_access_key_id",
        "aws_secret_access_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_jwt_key(self) -> Settings:
        if self.jwt_algorithm in HMAC_ALGORITHMS:
            if not self.jwt_secret:
                raise SettingsError(
                    f"SWITCHBOARD_JWT_SECRET: is required when SWITCHBOARD_JWT_ALGORITHM "
                    f"is {self.jwt_algorithm}"
                )
            if len(self.jwt_secret) < MIN_HMAC_SECRET_LENGTH:
                raise SettingsError(
                    f"SWITCHBOARD_JWT_SECRET: must be at least {MIN_HMAC_SECRET_LENGTH} characters"
                )
        elif not self.jwt_public_key or "BEGIN" not in self.jwt_public_key:
            raise SettingsError(
                "SWITCHBOARD_JWT_PUBLIC_KEY: a PEM public key is required when "
                f"SWITCHBOARD_JWT_ALGORITHM is {self.jwt_algorithm}"
            )
        return self

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def jwt_verification_key(self) -> str:
        return self.jwt_secret if self.jwt_algorithm in HMAC_ALGORITHMS else self.jwt_public_key  # type: ignore[return-value]


def check_origin(origin: str) -> str:
    """An exact origin, `scheme://host[:port]` (no wildcard, path, query or credentials),
    lower-cased as browsers send it in `Origin`."""
    problem = f"{origin!r} is not an origin (http[s]://host[:port], no path, no wildcard)"
    if "*" in origin:
        raise ValueError(problem)
    try:
        parts = urlsplit(origin)
        port = parts.port  # raises on a port that is not a number in range
    except ValueError:
        raise ValueError(problem) from None
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    plain = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
    if parts.scheme not in ("http", "https") or not parts.hostname or origin.lower() != plain:
        raise ValueError(problem)
    return plain


def normalise_database_url(value: str) -> str:
    """Accept `postgres://` (as Heroku gives it) and plain `postgresql://`; use psycopg 3."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        if value.startswith(prefix):
            return "postgresql+psycopg://" + value[len(prefix) :]
    raise ValueError("must be a postgres:// or postgresql:// URL")


_FIELD_TO_ENV = {
    name: field.validation_alias.choices[0]  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: the process environment).

    Raises `SettingsError` naming every variable that is missing or malformed.
    """
    source = dict(os.environ if environ is None else environ)
    try:
        # Passing values explicitly keeps tests free of process-environment leaks.
        return Settings(**{env: source[env] for env in _FIELD_TO_ENV.values() if env in source})
    except SettingsError:
        raise
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            variable = _FIELD_TO_ENV.get(field, field)
            message = "is required" if error["type"] == "missing" else error["msg"]
            if isinstance(error.get("ctx", {}).get("error"), SettingsError):
                problems.append(str(error["ctx"]["error"]))
                continue
            problems.append(f"{variable}: {message.removeprefix('Value error, ')}")
        raise SettingsError("; ".join(problems)) from None
