"""PostgreSQL adapters (asyncpg): one method per query, `$n` parameters, domain types out."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from billing.adapters.postgres_tls import DatabaseTls
from billing.domain.errors import ConcurrentDecisionError, TransientError
from billing.domain.model import (
    Customer,
    CustomerStatus,
    LedgerEntry,
    LedgerState,
    Marketplace,
    Period,
    Rate,
    RateCard,
    UsageTotal,
)
from billing.ports import CustomerHourState, Run

if TYPE_CHECKING:
    import uuid
    from collections.abc import AsyncIterator, Mapping, Sequence
    from datetime import timedelta

    from billing.domain.messages import BillMessageV1
    from billing.domain.model import SubmitResult
    from billing.domain.rating import Decision

# Errors of the connection or the server's availability: the item is retried, never recorded.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)

UNFINISHED = [s.value for s in LedgerState if not s.final]


class _NoResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """Skips the pool's reset query (advisory unlocks, CLOSE ALL, RESET ALL) on every release.

    Every statement here is a single autocommitted statement that sets no session state, so the
    reset would only add a round trip to each query.
    """

    def get_reset_query(self) -> str:
        return ""


class DsnSource(Protocol):
    """Where the database DSN comes from; it can change while the pool lives (a rotated password)."""

    async def current(self) -> str:
        """The DSN to connect with now."""
        ...

    async def after_refusal(self, refused: str) -> str:
        """The DSN to try after the server refused ``refused``'s credentials: read again from its source,
        and ``refused`` itself when nothing changed."""
        ...


class FixedDsn:
    """A DSN that never changes (DATABASE_URL)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    async def current(self) -> str:
        return self._dsn

    async def after_refusal(self, refused: str) -> str:
        return refused


class _Connector:
    """asyncpg's ``connect`` for the pool: the current DSN, and once more with a DSN read afresh when the
    server refuses the password (SQLSTATE class 28). A warm environment whose pool reconnects after a
    password rotation then picks up the new secret instead of failing every message into the DLQ."""

    def __init__(self, dsns: DsnSource, tls: DatabaseTls) -> None:
        self._dsns = dsns
        self._tls = tls

    async def __call__(self, *_: Any, **options: Any) -> asyncpg.Connection:
        dsn = await self._dsns.current()
        try:
            return await asyncpg.connect(dsn, ssl=self._tls.context_for(dsn), **options)
        except asyncpg.exceptions.InvalidAuthorizationSpecificationError:
            fresh = await self._dsns.after_refusal(dsn)
            if fresh == dsn:
                raise
        return await asyncpg.connect(fresh, ssl=self._tls.context_for(fresh), **options)


async def create_pool(dsns: DsnSource | str, max_size: int, tls: DatabaseTls | None = None) -> asyncpg.Pool:
    """A small pool: one Lambda environment bills one customer at a time."""
    source = FixedDsn(dsns) if isinstance(dsns, str) else dsns
    try:
        pool = await asyncpg.create_pool(
            min_size=1,
            max_size=max_size,
            connect=_Connector(source, tls or DatabaseTls()),
            connection_class=_NoResetConnection,
            # the session runs in UTC so date_trunc('hour', ...) means the UTC hour
            server_settings={"timezone": "UTC", "application_name": "marketplace-billing"},
            command_timeout=30,
        )
    except TRANSIENT_DB_ERRORS as exc:
        raise TransientError(f"database unavailable: {type(exc).__name__}") from exc
    return pool


def _customer(row: Mapping[str, Any]) -> Customer:
    return Customer(
        id=row["id"],
        marketplace=Marketplace(row["marketplace"]),
        status=CustomerStatus(row["status"]),
        active_from=row["active_from"],
        active_until=row["active_until"],
        aws_customer_identifier=row["aws_customer_identifier"],
        aws_account_id=row["aws_account_id"],
        aws_product_code=row["aws_product_code"],
        aws_license_arn=row["aws_license_arn"],
        gcp_usage_reporting_id=row["gcp_usage_reporting_id"],
        gcp_service_name=row["gcp_service_name"],
        azure_resource_id=row["azure_resource_id"],
        azure_resource_uri=row["azure_resource_uri"],
        azure_plan_id=row["azure_plan_id"],
    )


def _entry(row: Mapping[str, Any], period: Period) -> LedgerEntry:
    return LedgerEntry(
        customer_id=row["customer_id"],
        dimension=row["dimension"],
        period=period,
        quantity=int(row["quantity"]),
        state=LedgerState(row["state"]),
        attempts=int(row["attempts"]),
        record_id=row["record_id"],
        last_error=row["last_error"],
    )


_LOAD = """
SELECT c.*,
  (SELECT coalesce(json_agg(json_build_object(
        'customer_id', l.customer_id, 'dimension', l.dimension, 'quantity', l.quantity,
        'state', l.state, 'attempts', l.attempts, 'record_id', l.record_id,
        'last_error', l.last_error)), '[]')
     FROM ledger l WHERE l.customer_id = c.id AND l.period = $2) AS entries,
  (SELECT coalesce(json_agg(json_build_array(b.dimension, b.carry::text)), '[]')
     FROM balances b WHERE b.customer_id = c.id) AS carries,
  (SELECT coalesce(json_agg(json_build_array(o.dimension, o.hour, o.rated::text)), '[]')
     FROM usage_observations o WHERE o.customer_id = c.id AND o.hour >= $3 AND o.hour < $4) AS observed
FROM customers c WHERE c.id = $1
"""

_DECIDE = """
WITH v AS (
  UPDATE customers SET billing_version = billing_version + 1
   WHERE id = $1 AND billing_version = $2 RETURNING id
), l AS (
  INSERT INTO ledger (customer_id, period, dimension, quantity, state, rated, carry_in, carry_out,
                      run_id, attempts, lease_owner, lease_until)
  SELECT v.id, $3, d.dimension, d.quantity, d.state, d.rated, d.carry_in, d.carry_out,
         $4, d.attempts, CASE WHEN d.attempts > 0 THEN $5 END,
         CASE WHEN d.attempts > 0 THEN now() + $6::interval END
    FROM v, unnest($7::text[], $8::bigint[], $9::text[], $10::numeric[], $11::numeric[], $12::numeric[],
                   $13::int[]) AS d(dimension, quantity, state, rated, carry_in, carry_out, attempts)
  RETURNING 1
), b AS (
  INSERT INTO balances (customer_id, dimension, carry)
  SELECT v.id, d.dimension, d.carry FROM v, unnest($7::text[], $12::numeric[]) AS d(dimension, carry)
  ON CONFLICT (customer_id, dimension) DO UPDATE SET carry = excluded.carry, updated_at = now()
  RETURNING 1
), o AS (
  INSERT INTO usage_observations (customer_id, dimension, hour, rated)
  SELECT v.id, o.dimension, o.hour, o.rated
    FROM v, unnest($14::text[], $15::timestamptz[], $16::numeric[]) AS o(dimension, hour, rated)
  ON CONFLICT (customer_id, dimension, hour) DO UPDATE SET rated = excluded.rated
  RETURNING 1
)
SELECT (SELECT count(*) FROM v) AS decided, (SELECT count(*) FROM l) AS rows,
       (SELECT count(*) FROM b) AS balances, (SELECT count(*) FROM o) AS observations
"""

# Claim the hour's unfinished rows for one more submission. A row leased by another delivery is
# skipped (the lease condition is on the row itself, so Postgres re-checks it after a concurrent update).
_CLAIM = """
UPDATE ledger SET state = 'submitted', attempts = attempts + 1, lease_owner = $3,
                  -- still 'submitted' here: the last attempt's answer was never recorded
                  unconfirmed = unconfirmed OR state = 'submitted',
                  lease_until = now() + $4::interval, updated_at = now()
 WHERE customer_id = $1 AND period = $2 AND state = ANY($5::text[])
   AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $3)
RETURNING customer_id, dimension, quantity, state, attempts, record_id, last_error
"""

_RECORD = """
UPDATE ledger l SET state = r.state, record_id = coalesce(r.record_id, l.record_id), last_error = r.reason,
                    unconfirmed = l.unconfirmed OR r.state = 'submitted',
                    -- failed or rejected: the marketplace's answer proved it did not take the record
                    refused_attempts = l.refused_attempts + (r.state IN ('failed', 'rejected'))::int,
                    lease_owner = NULL, lease_until = NULL, updated_at = now()
  FROM unnest($4::text[], $5::text[], $6::text[], $7::text[]) AS r(dimension, state, record_id, reason)
 WHERE l.customer_id = $1 AND l.period = $2 AND l.dimension = r.dimension AND l.lease_owner = $3
"""

# An hour outside the marketplace's window: rows every attempt of which was refused give their quantity
# back to the carried balance (billed with a later hour); rows that may have been received cannot (a
# submission unconfirmed, or an attempt without a refusal on record), and are rejected with a reason for
# an operator.
_EXPIRE = """
WITH e AS (
  UPDATE ledger SET state = CASE WHEN state = 'submitted' OR unconfirmed OR refused_attempts < attempts
                                 THEN 'rejected' ELSE 'expired' END,
                    last_error = CASE WHEN state = 'submitted' OR unconfirmed OR refused_attempts < attempts
                                      THEN $4 ELSE $5 END,
                    lease_owner = NULL, lease_until = NULL, updated_at = now()
   WHERE customer_id = $1 AND period = $2 AND state = ANY($6::text[])
     AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $3)
  RETURNING dimension, quantity, state
), b AS (
  UPDATE balances b SET carry = b.carry + e.quantity, updated_at = now()
    FROM e WHERE b.customer_id = $1 AND b.dimension = e.dimension AND e.state = 'expired'
  RETURNING 1
), v AS (
  UPDATE customers SET billing_version = billing_version + 1
   WHERE id = $1 AND EXISTS (SELECT 1 FROM e) RETURNING 1
)
SELECT count(*) FROM e
"""


class PostgresBillingRepository:
    """The biller's reads and writes: at most four round trips per customer-hour."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def load(
        self, customer_id: str, period: Period, window_start: datetime
    ) -> CustomerHourState | None:
        row = await self._pool.fetchrow(_LOAD, customer_id, period.start, window_start, period.end)
        if row is None:
            return None
        entries = tuple(_entry(e, period) for e in json.loads(row["entries"]))
        carries = {d: Decimal(c) for d, c in json.loads(row["carries"])}
        observed = {(d, _parse_ts(h)): Decimal(r) for d, h, r in json.loads(row["observed"])}
        return CustomerHourState(
            customer=_customer(row),
            version=int(row["billing_version"]),
            entries=entries,
            carries=carries,
            observed=observed,
        )

    async def record_decision(
        self,
        state: CustomerHourState,
        message: BillMessageV1,
        decision: Decision,
        entry_states: Mapping[str, tuple[str, int]],
        owner: str,
        lease: timedelta,
    ) -> bool:
        dims = decision.dimensions
        obs = sorted(decision.observations.items())
        try:
            row = await self._pool.fetchrow(
                _DECIDE,
                state.customer.id,
                state.version,
                message.billing_period.start,
                message.run_id,
                owner,
                lease,
                [d.dimension for d in dims],
                [d.quantity for d in dims],
                [entry_states[d.dimension][0] for d in dims],
                [d.rated for d in dims],
                [d.carry_in for d in dims],
                [d.carry_out for d in dims],
                [entry_states[d.dimension][1] for d in dims],
                [k[0] for k, _ in obs],
                [k[1] for k, _ in obs],
                [v for _, v in obs],
            )
        except asyncpg.exceptions.UniqueViolationError as exc:
            raise ConcurrentDecisionError("this hour was decided by a concurrent delivery") from exc
        assert row is not None
        return bool(row["decided"])

    async def claim(
        self, customer_id: str, period: Period, owner: str, lease: timedelta
    ) -> tuple[LedgerEntry, ...] | None:
        rows = await self._pool.fetch(_CLAIM, customer_id, period.start, owner, lease, UNFINISHED)
        if not rows:
            return None
        return tuple(_entry(r, period) for r in rows)

    async def record_results(
        self, customer_id: str, period: Period, owner: str, results: Sequence[SubmitResult]
    ) -> None:
        await self._pool.execute(
            _RECORD,
            customer_id,
            period.start,
            owner,
            [r.dimension for r in results],
            [r.state.value for r in results],
            [r.record_id for r in results],
            [r.reason for r in results],
        )

    async def expire(self, customer_id: str, period: Period, owner: str, window: str) -> int:
        unconfirmed = (
            f"outside the marketplace's {window} window after a submission the marketplace may have "
            "received (its answer never proved a refusal): check the marketplace's records before billing "
            "it again"
        )
        carried = f"outside the marketplace's {window} window: quantity carried to a later hour"
        count = await self._pool.fetchval(
            _EXPIRE, customer_id, period.start, owner, unconfirmed, carried, UNFINISHED
        )
        return int(count)

    async def rate_card(self) -> RateCard:
        rows = await self._pool.fetch("SELECT marketplace, metric, dimension, factor FROM rate_card")
        return RateCard(
            tuple(
                Rate(Marketplace(r["marketplace"]), r["metric"], r["dimension"], Decimal(r["factor"]))
                for r in rows
            )
        )


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


class PostgresDispatchRepository:
    """The dispatcher's reads and writes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def start_run(self, period: Period) -> Run:
        row = await self._pool.fetchrow(
            """
            INSERT INTO billing_runs (period) VALUES ($1)
            ON CONFLICT (period) DO UPDATE SET attempts = billing_runs.attempts + 1
            RETURNING id, dispatched, dispatched_at IS NOT NULL AS completed
            """,
            period.start,
        )
        assert row is not None
        return Run(id=row["id"], period=period, dispatched=row["dispatched"], completed=row["completed"])

    async def customers_to_bill(self, period: Period, page_size: int) -> AsyncIterator[list[str]]:
        """Keyset pages of the customers billable in the hour whose bill is not finished."""
        after = ""
        while True:
            rows = await self._pool.fetch(
                """
                SELECT c.id FROM customers c
                  LEFT JOIN subscription_state s ON s.customer_id = c.id
                 WHERE c.id > $1
                   -- a subject the marketplaces manage: billed for an hour it was ACTIVE during (a
                   -- suspension's hours and every hour after its end are not); a seeded customer without
                   -- a subscription: its status and active range, as before
                   AND CASE WHEN s.customer_id IS NOT NULL THEN s.billable && tstzrange($2, $3)
                            ELSE c.status = 'active' AND c.active_from < $3
                                 AND (c.active_until IS NULL OR c.active_until > $2) END
                   AND (NOT EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $2)
                        OR EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = $2
                                      AND l.state = ANY($5::text[])))
                 ORDER BY c.id LIMIT $4
                """,
                after,
                period.start,
                period.end,
                page_size,
                UNFINISHED,
            )
            if not rows:
                return
            ids = [r["id"] for r in rows]
            yield ids
            after = ids[-1]

    async def finish_run(self, run_id: uuid.UUID, dispatched: int) -> None:
        await self._pool.execute(
            "UPDATE billing_runs SET dispatched = $2, dispatched_at = now() WHERE id = $1", run_id, dispatched
        )


class PostgresUsageSource:
    """Usage summed per (hour, metric) in one SQL statement, whatever the number of clusters."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def hourly_usage(self, customer_id: str, start: datetime, end: datetime) -> list[UsageTotal]:
        rows = await self._pool.fetch(
            """
            SELECT date_trunc('hour', ts) AS hour, metric, sum(quantity) AS quantity
              FROM usage WHERE customer_id = $1 AND ts >= $2 AND ts < $3
             GROUP BY 1, 2
            """,
            customer_id,
            start,
            end,
        )
        return [UsageTotal(r["hour"], r["metric"], Decimal(r["quantity"])) for r in rows]
