"""Configuration: one model, read once from the environment and validated at cold start."""

from __future__ import annotations

import enum
from datetime import timedelta
from pathlib import Path
from typing import Self

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.domain.errors import ConfigurationError


class UsageSourceKind(enum.StrEnum):
    POSTGRES = "postgres"
    ELASTICSEARCH = "elasticsearch"


class Settings(BaseSettings):
    """Every setting of both functions. Secrets are SecretStr and never logged."""

    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore", frozen=True)

    # database: a full DSN (the embedded server listens on a Unix socket), or a Secrets Manager ARN
    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "BILLING_DATABASE_URL")
    )
    database_secret_arn: str | None = None
    db_pool_max: int = Field(default=2, ge=1, le=100)
    # TLS to a TCP database: verify-full against these CA certificates (default: the RDS and RDS Proxy
    # bundles shipped in the layer). False uses the DSN as given, for a local server without TLS.
    db_ca_bundle: Path | None = None
    db_tls_verify: bool = True

    queue_url: str | None = None
    # Lanes: each marketplace's own queue (the Dispatcher sends there; the Biller puts a throttled message
    # back there). Unset: the marketplace shares BILLING_QUEUE_URL.
    aws_queue_url: str | None = None
    gcp_queue_url: str | None = None
    azure_queue_url: str | None = None
    # Each lane's documented quota, in calls (Google: quota units) a second, shared by the lane's
    # environments (BILLING_*_LANE_ENVIRONMENTS: the lane's MaximumConcurrency in Lambda, 1 for the local
    # runner's one process). 0 = not paced. Sources: template.yaml's quota parameters.
    aws_quota_per_second: float = Field(default=10.0, ge=0)
    gcp_quota_per_second: float = Field(default=100_000.0, ge=0)
    azure_quota_per_second: float = Field(default=0.0, ge=0)
    # The least delay of a throttled message's copy on its lane (its throttles lasted a whole budget: give
    # the marketplace's quota time to recover before the lane tries the customer again); jittered up to 2x
    requeue_delay_seconds: int = Field(default=30, ge=0, le=450)
    # false: a bill throttled for its whole budget fails its item like any other (SQS redelivers it and,
    # after maxReceiveCount, dead-letters it); the fault suite's outage scenarios count on that
    requeue_throttled: bool = True
    # The pace stays this far under the quota, so that the network's and the event loop's jitter do not
    # push one call too many into a second (measured: `make bench`, section quota)
    pace_headroom: float = Field(default=0.9, gt=0, le=1)
    aws_lane_environments: int = Field(default=1, ge=1, le=1000)
    gcp_lane_environments: int = Field(default=1, ge=1, le=1000)
    azure_lane_environments: int = Field(default=1, ge=1, le=1000)

    usage_source: UsageSourceKind = UsageSourceKind.POSTGRES
    es_url: str | None = None
    es_api_key: SecretStr | None = None
    es_api_key_secret_arn: str | None = None
    es_index: str = "usage-*"
    es_field_timestamp: str = "@timestamp"
    es_field_customer: str = "customer_id"
    es_field_metric: str = "metric"
    es_field_quantity: str = "quantity"
    es_timeout_seconds: float = Field(default=10.0, gt=0)

    settle_delay_minutes: int = Field(default=15, ge=0, le=59)
    lookback_hours: int = Field(default=24, ge=1, le=24 * 7)
    lease_seconds: int = Field(default=120, ge=10)
    dispatch_page_size: int = Field(default=1000, ge=10, le=10_000)
    dispatch_in_flight: int = Field(default=8, ge=1, le=64)
    marketplace_attempts: int = Field(default=4, ge=1, le=10)
    # How long one bill may take, all retries included (the biller's own, the marketplace adapters', token
    # fetches): past it the bill stops and SQS redelivers the message, instead of Lambda killing the
    # invocation at its Timeout with no log or metric. tests/unit/test_retry_budget.py keeps it, plus
    # time to unwind, under the Biller's Timeout in template.yaml.
    invocation_budget_seconds: float = Field(default=45.0, gt=0, le=900)
    # Whether the APM agent registers each Lambda transaction with the APM extension when the invocation
    # starts (a synchronous POST /register/transaction, one round trip to the extension before the bill
    # begins), so that an invocation killed before its end (a timeout, out of memory) still shows in
    # APM. On, as the agent does by default: measured at about nothing on a quiet machine and a few ms
    # on a loaded one (bench/lambda_warm.py prints both); the bill's own budget already ends a bill
    # with its transaction before the function's Timeout. template.yaml: ApmRegisterTransactions.
    apm_register_transactions: bool = True

    @model_validator(mode="after")
    def _usage_source_complete(self) -> Self:
        if self.usage_source is UsageSourceKind.ELASTICSEARCH and not self.es_url:
            raise ValueError("BILLING_ES_URL is required when BILLING_USAGE_SOURCE=elasticsearch")
        return self

    def lane_queue_url(self, marketplace: str) -> str | None:
        """The marketplace's lane queue (or the shared queue)."""
        url: str | None = getattr(self, f"{marketplace}_queue_url")
        return url or self.queue_url

    def pace(self, marketplace: str) -> float | None:
        """Calls a second this execution environment may start for the marketplace (None: unpaced):
        the lane's quota (less the headroom) over the environments that share it."""
        quota: float = getattr(self, f"{marketplace}_quota_per_second")
        environments: int = getattr(self, f"{marketplace}_lane_environments")
        return quota * self.pace_headroom / environments if quota > 0 else None

    @property
    def settle_delay(self) -> timedelta:
        return timedelta(minutes=self.settle_delay_minutes)

    @property
    def lookback(self) -> timedelta:
        return timedelta(hours=self.lookback_hours)

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)


def load_settings() -> Settings:
    """Read the settings, turning a validation error into a ConfigurationError that names the fields."""
    try:
        return Settings()
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid configuration: {fields}") from None
