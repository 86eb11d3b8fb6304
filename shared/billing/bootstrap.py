"""The composition root: builds the real adapters once per execution environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from billing.config import Settings, UsageSourceKind
from billing.domain.errors import ConfigurationError
from billing.domain.model import Marketplace

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import asyncpg

    from billing.domain.messages import BillMessageV1
    from billing.ports import (
        BillingRepository,
        DispatchRepository,
        MarketplaceClient,
        MessageQueue,
        UsageSource,
    )
    from billing.services.bill import Biller
    from billing.services.dispatch import DispatchResult


_T = TypeVar("_T")


def _secret(arn: str, *, fresh: bool = False) -> str:
    """A secret from Secrets Manager, cached by Powertools (read at cold start, refreshed hourly);
    ``fresh`` reads it now whatever the cache holds (the value held was refused: it may have been rotated)."""
    from aws_lambda_powertools.utilities.parameters import get_secret
    from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError

    try:
        value = get_secret(arn, max_age=3600, force_fetch=fresh)
    except GetParameterError as exc:
        # the AWS error (not found, access denied...) names the secret, never a value
        raise ConfigurationError(f"cannot read secret {arn}: {exc}") from None
    return value if isinstance(value, str) else value.decode()


def database_dsn(settings: Settings, *, fresh: bool = False) -> str:
    """The DSN from DATABASE_URL, or from a secret holding a DSN or RDS's JSON secret format."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    if not settings.database_secret_arn:
        raise ConfigurationError("set DATABASE_URL or BILLING_DATABASE_SECRET_ARN")
    raw = _secret(settings.database_secret_arn, fresh=fresh).strip()
    if not raw.startswith("{"):
        return raw
    return _rds_secret_dsn(raw, settings.database_secret_arn)


class DatabaseSecret:
    """The DSN as the settings give it, read again from the secret when the server refuses its password.

    Secrets Manager rotation changes the password in the database, then the secret: a warm environment's
    pool holds the old one, and its next new connection would be refused until Powertools' hourly refresh.
    """

    def __init__(self, settings: Settings, dsn: str) -> None:
        self._settings = settings
        self._dsn = dsn
        self._lock = asyncio.Lock()

    async def current(self) -> str:
        return self._dsn

    async def after_refusal(self, refused: str) -> str:
        async with self._lock:  # the pool's connections are refused together: one read serves them all
            if self._dsn == refused and self._settings.database_url is None:
                self._dsn = await asyncio.to_thread(database_dsn, self._settings, fresh=True)
            return self._dsn


def _rds_secret_dsn(raw: str, arn: str) -> str:
    """A DSN from RDS's JSON secret; host and port go in the query, so a socket dir or IPv6 host works."""
    from urllib.parse import quote, urlencode

    try:
        doc = json.loads(raw)
    except ValueError:
        # from None: the decode error keeps the whole secret text
        raise ConfigurationError(f"secret {arn} is neither a DSN nor RDS's JSON secret") from None
    missing = [key for key in ("username", "password", "host") if not isinstance(doc.get(key), str)]
    if missing:
        raise ConfigurationError(f"secret {arn} lacks {', '.join(missing)} (RDS's JSON secret format)")
    query = urlencode({"host": doc["host"], "port": doc.get("port", 5432)})
    return (
        f"postgresql://{quote(doc['username'], safe='')}:{quote(doc['password'], safe='')}"
        f"@/{quote(str(doc.get('dbname', 'postgres')), safe='')}?{query}"
    )


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _wrapped(wrap: Callable[[_T], _T] | None, inner: _T) -> _T:
    return inner if wrap is None else wrap(inner)


class Wrappers:
    """What the root wraps each collaborator in once built (or given): the seam fault injection uses."""

    def __init__(
        self,
        *,
        repository: Callable[[BillingRepository], BillingRepository] | None = None,
        usage_source: Callable[[UsageSource], UsageSource] | None = None,
        marketplace: Callable[[MarketplaceClient], MarketplaceClient] | None = None,
        queue: Callable[[MessageQueue], MessageQueue] | None = None,
    ) -> None:
        self.repository = repository
        self.usage_source = usage_source
        self.marketplace = marketplace
        self.queue = queue


class Runtime:
    """What one execution environment keeps warm: the pool, the clients, the settings.

    Every collaborator is a parameter with the production default (cosmicpython's ``bootstrap``): the
    handlers pass only the settings, tests and benchmarks pass their clock, an AWS session, fakes of
    the ports, or ``wrappers`` around the real adapters. Defaults are built on first use, so a cold
    start imports only what its function uses.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] | None = None,
        aws_session: Any = None,
        repository: BillingRepository | None = None,
        usage_source: UsageSource | None = None,
        marketplaces: Mapping[Marketplace, MarketplaceClient] | None = None,
        dispatch_repository: DispatchRepository | None = None,
        queue: MessageQueue | None = None,
        wrappers: Wrappers | None = None,
    ) -> None:
        self.settings = settings
        # the one clock of the environment: what "has this hour ended?" is asked of
        self.clock: Callable[[], datetime] = clock or _wall_clock
        self._given_repository = repository
        self._given_usage = usage_source
        self._given_dispatch_repository = dispatch_repository
        self._queue: MessageQueue | None = queue
        self._wrappers = wrappers or Wrappers()
        # The database secret is read now, at cold start: one that cannot be read fails the init (a Lambda
        # error, alarmed) instead of failing every message until it reaches the DLQ. Other secrets are
        # read when their adapter is first built (the Dispatcher may not even read them).
        self._dsn = (
            database_dsn(settings) if settings.database_secret_arn and not settings.database_url else None
        )
        from billing.adapters.postgres_tls import database_tls

        self._tls = database_tls(settings)
        known = self._dsn or (settings.database_url.get_secret_value() if settings.database_url else None)
        if known is not None:
            self._tls.check(known)  # a DSN asking for weak TLS, or a missing CA file, fails the init
        self._stack = contextlib.AsyncExitStack()
        self._pool: asyncpg.Pool | None = None
        self._session: Any = aws_session
        self._given_marketplaces = {
            marketplace: _wrapped(self._wrappers.marketplace, client)
            for marketplace, client in (marketplaces or {}).items()
        }
        self._marketplaces: dict[Marketplace, MarketplaceClient] = dict(self._given_marketplaces)
        self._biller: Biller | None = None
        self._lock = asyncio.Lock()  # builds marketplace adapters
        self._build_lock = asyncio.Lock()  # builds the pool and the biller: first callers race at cold start

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._build_lock:
                if self._pool is None:
                    from billing.adapters.postgres import create_pool

                    dsn = self._dsn or database_dsn(self.settings)
                    secret = DatabaseSecret(self.settings, dsn)
                    pool = await create_pool(secret, self.settings.db_pool_max, self._tls)
                    self._stack.push_async_callback(pool.close)
                    self._pool = pool
        return self._pool

    def _aws_session(self) -> Any:
        if self._session is None:
            import aioboto3

            from billing.adapters.aws_metering import use_shipped_models

            # the layer's newer meteringmarketplace model (LicenseArn) first on this session's data path
            self._session = use_shipped_models(aioboto3.Session())
        return self._session

    async def aws_client(self, service: str, **config: Any) -> Any:
        """An aioboto3 client kept open for the environment's life; endpoints from AWS_ENDPOINT_URL_*."""
        from botocore.config import Config

        options: dict[str, Any] = {
            "retries": {"mode": "standard", "total_max_attempts": self.settings.marketplace_attempts},
            "connect_timeout": 5,
            "read_timeout": 15,
        }
        client_config = Config(**(options | config))
        return await self._stack.enter_async_context(
            self._aws_session().client(service, config=client_config)
        )

    async def marketplace(self, marketplace: Marketplace) -> MarketplaceClient:
        """The marketplace's adapter, built on first use (so unused SDKs are never imported)."""
        async with self._lock:
            if marketplace not in self._marketplaces:
                built = await self._build_marketplace(marketplace)
                self._marketplaces[marketplace] = _wrapped(self._wrappers.marketplace, built)
        return self._marketplaces[marketplace]

    async def _build_marketplace(self, marketplace: Marketplace) -> MarketplaceClient:
        from billing.adapters.pacing import Pacer

        pacer = Pacer(self.settings.pace(marketplace.value))
        if marketplace is Marketplace.AWS:
            from billing.adapters.aws_metering import AwsMeteringClient

            # as many connections as bills may run at once in this process (one in Lambda)
            client = await self.aws_client(
                "meteringmarketplace",
                max_pool_connections=max(10, self.settings.db_pool_max),
                # one attempt a call: the adapter retries, knowing each attempt's outcome
                retries={"mode": "standard", "total_max_attempts": 1},
            )
            return AwsMeteringClient(client, attempts=self.settings.marketplace_attempts, pacer=pacer)
        if marketplace is Marketplace.GCP:
            from billing.adapters import gcp_service_control

            return await gcp_service_control.create(
                self._stack, _secret, self.settings.marketplace_attempts, pacer
            )
        if marketplace is Marketplace.AZURE:
            from billing.adapters import azure_metering

            return await azure_metering.create(
                self._stack, _secret, self.settings.marketplace_attempts, pacer
            )
        raise ConfigurationError(f"no adapter for the {marketplace} marketplace")

    async def usage_source(self) -> UsageSource:
        source = self._given_usage or await self._build_usage_source()
        return _wrapped(self._wrappers.usage_source, source)

    async def _build_usage_source(self) -> UsageSource:
        if self.settings.usage_source is UsageSourceKind.ELASTICSEARCH:
            from elasticsearch import AsyncElasticsearch

            from billing.adapters.usage_elasticsearch import ElasticsearchUsageSource

            api_key = self.settings.es_api_key.get_secret_value() if self.settings.es_api_key else None
            if api_key is None and self.settings.es_api_key_secret_arn:
                api_key = _secret(self.settings.es_api_key_secret_arn)
            es = AsyncElasticsearch(
                self.settings.es_url, api_key=api_key, request_timeout=self.settings.es_timeout_seconds
            )
            self._stack.push_async_callback(es.close)
            return ElasticsearchUsageSource(es, self.settings)
        from billing.adapters.postgres import PostgresUsageSource

        return PostgresUsageSource(await self.pool())

    @property
    def built_biller(self) -> Biller | None:
        """The environment's Biller once built (a warm invocation), else None."""
        return self._biller

    async def biller(self) -> Biller:
        if self._biller is None:
            await self._build_biller()
        assert self._biller is not None
        return self._biller

    async def _build_biller(self) -> None:
        repo = self._given_repository
        if repo is None:
            pool = await self.pool()
            from billing.adapters.postgres import PostgresBillingRepository

            repo = PostgresBillingRepository(pool)
        async with self._build_lock:
            if self._biller is not None:
                return
            from billing.services.bill import Biller, RateCardCache

            repo = _wrapped(self._wrappers.repository, repo)
            self._biller = Biller(
                repo=repo,
                usage=await self.usage_source(),
                marketplace=self.marketplace,
                rate_cards=RateCardCache(repo),
                lookback_hours=self.settings.lookback_hours,
                lease_seconds=self.settings.lease_seconds,
                budget_seconds=self.settings.invocation_budget_seconds,
                clock=self.clock,
                requeue=self.requeue if self.settings.requeue_throttled else None,
            )

    async def queue(self) -> MessageQueue:
        """The billing queues (one lane per marketplace), through one SQS client, unless one was given."""
        if self._queue is None:
            from billing.adapters.sqs import SqsQueue

            sqs = await self.aws_client("sqs")
            lanes = {m: url for m in Marketplace if (url := getattr(self.settings, f"{m.value}_queue_url"))}
            built: MessageQueue = SqsQueue(
                sqs, self.settings.queue_url, in_flight=self.settings.dispatch_in_flight, lanes=lanes
            )
            self._queue = _wrapped(self._wrappers.queue, built)
        return self._queue

    async def requeue(self, message: BillMessageV1, lane: Marketplace, retry_after: float | None) -> None:
        """A fresh copy of a throttled message on its lane, delayed past Retry-After with jitter (SQS's
        DelaySeconds is at most 900)."""
        least = self.settings.requeue_delay_seconds
        delay = min(900, math.ceil(max(retry_after or 0.0, least) + random.uniform(0, least)))
        await (await self.queue()).send([message], lane=lane, delay_seconds=delay)

    async def dispatch(self, event: dict[str, Any]) -> DispatchResult:
        from billing.adapters.postgres import PostgresDispatchRepository
        from billing.events import dispatch_request
        from billing.services.dispatch import dispatch

        request = dispatch_request(event, self.settings.settle_delay, self.clock)
        if self._queue is None and not all(self.settings.lane_queue_url(m.value) for m in Marketplace):
            raise ConfigurationError("set BILLING_QUEUE_URL or every lane's BILLING_<MARKETPLACE>_QUEUE_URL")
        queue = await self.queue()
        repo = self._given_dispatch_repository or PostgresDispatchRepository(await self.pool())
        return await dispatch(
            request.period,
            repo,
            queue,
            self.settings.dispatch_page_size,
            resend_unbilled=request.resend_unbilled,
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._pool = None
        self._biller = None
        self._marketplaces = dict(self._given_marketplaces)
