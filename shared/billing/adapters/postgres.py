"""PostgreSQL adapters (asyncpg): one method per query, `$n` parameters, domain types out."""

from __future__ import annotations

import json
import re
import ssl
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from billing.adapters.postgres_tls import DatabaseTls
from billing.domain.errors import ConcurrentDecisionError, ConfigurationError, TransientError
from billing.domain.model import (
    REFUSED_STATES,
    UNFINISHED_STATES,
    Customer,
    CustomerStatus,
    LedgerEntry,
    LedgerState,
    Marketplace,
    Period,
    Rate,
    RateCard,
    UsageTotal,
    expiry_reasons,
)
from billing.domain.subscriptions import PlanSpan
from billing.ports import CustomerHourState, Run

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

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

# Ledger states reach SQL only as parameters bound from LedgerState, never as literals in the text: a
# statement names them :state_<value> (one state) or :states_unfinished / :states_refused (sets), and
# a name no state has fails when the module is imported.
STATE_PARAMETERS: dict[str, object] = {
    **{f"state_{s.value}": s.value for s in LedgerState},
    "states_unfinished": sorted(s.value for s in UNFINISHED_STATES),
    "states_refused": sorted(s.value for s in REFUSED_STATES),
}

# `:name` not preceded by a colon or a word character, so `::type` casts and `a:b` inside text are left alone
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Statement:
    """SQL written with ``:named`` parameters, compiled once to asyncpg's positional ``$n``."""

    text: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, sql: str) -> Statement:
        names: list[str] = []

        def number(found: re.Match[str]) -> str:
            name = found.group(1)
            if name.startswith(("state_", "states_")) and name not in STATE_PARAMETERS:
                raise ValueError(f"{name!r} names no ledger state (LedgerState)")
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        return cls(_NAMED.sub(number, sql), tuple(names))

    def args(self, **values: object) -> list[object]:
        """The positional arguments for ``values`` by name; ledger states are bound here, from the enum."""
        given = {**STATE_PARAMETERS, **values}
        missing = [n for n in self.names if n not in given]
        unused = values.keys() - set(self.names)
        overridden = values.keys() & STATE_PARAMETERS.keys()
        if missing or unused or overridden:
            raise TypeError(
                f"statement parameters: missing {missing}, unknown {sorted(unused)}, "
                f"ledger states not from LedgerState {sorted(overridden)}"
            )
        return [given[n] for n in self.names]


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


async def create_pool(
    dsns: DsnSource | str, max_size: int, tls: DatabaseTls | None = None, command_timeout: float | None = 30
) -> asyncpg.Pool:
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
            command_timeout=command_timeout,
        )
    except asyncpg.exceptions.ClientConfigurationError as exc:
        # a DSN that is not one (an InterfaceError, which the next clause would call transient)
        raise ConfigurationError(f"the database DSN is not a PostgreSQL DSN: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        # not transient: the same server answers with the same certificate until the deployment changes
        # (the DSN's host name, or a CA the layer does not ship); the message names neither the DSN nor
        # its password
        raise ConfigurationError(
            f"the database server's certificate does not verify ({exc.verify_message}): the DSN must name "
            "a host the certificate covers, signed by a CA of the layer's bundle (billing/certs), or set "
            "sslrootcert in the DSN"
        ) from None
    except TRANSIENT_DB_ERRORS as exc:  # before ValueError: an SSL error is both
        raise TransientError(f"database unavailable: {type(exc).__name__}") from exc
    except ValueError as exc:
        # asyncpg's parser raises a plain ValueError for a port that is not a number
        raise ConfigurationError(f"the database DSN is not a PostgreSQL DSN: {exc}") from None
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


# #13, "never both identities for one customer and hour (AWS bills both)": while AWS moves a listing to
# licenses (Seller Guide, "Concurrent agreements": a record by LicenseArn and one by CustomerIdentifier +
# ProductCode for one account and product are two charges), a legacy subject is not billed for an hour a
# license subject of the same AWS account and product is billable during: the license bills it. Needs the
# legacy subject's account id (the SNS message's customer-aws-account-id, or ResolveCustomer's answer).
def _superseded(legacy: str, start: str, end: str) -> str:
    return f"""EXISTS (SELECT 1 FROM subscription_state lic
   WHERE {legacy}.marketplace = 'aws' AND lic.marketplace = 'aws' AND lic.customer_id IS NOT NULL
     AND {legacy}.identity->>'aws_license_arn' IS NULL AND lic.identity->>'aws_license_arn' IS NOT NULL
     AND lic.identity->>'aws_account_id' = {legacy}.identity->>'aws_account_id'
     AND lic.identity->>'aws_product_code' = {legacy}.identity->>'aws_product_code'
     AND lic.billable && tstzrange({start}, {end}))"""


# The other way round: a license that arrives late, effective from an hour its account's legacy subject
# has already sent records for (decided before the license was known), leaves that hour to the legacy
# records; its usage of the hour is rated into its next decided hour by the look-back, never lost.
def _billed_by_legacy(license_: str, period: str) -> str:
    return f"""EXISTS (SELECT 1 FROM subscription_state leg JOIN ledger l ON l.customer_id = leg.customer_id
   WHERE {license_}.marketplace = 'aws' AND leg.marketplace = 'aws'
     AND {license_}.identity->>'aws_license_arn' IS NOT NULL AND leg.identity->>'aws_license_arn' IS NULL
     AND leg.identity->>'aws_account_id' = {license_}.identity->>'aws_account_id'
     AND leg.identity->>'aws_product_code' = {license_}.identity->>'aws_product_code'
     AND l.period = {period} AND l.state <> :state_skipped AND l.state <> :state_expired)"""


_LOAD = Statement.of(
    """
SELECT c.*,
  (SELECT coalesce(json_agg(json_build_object(
        'customer_id', l.customer_id, 'dimension', l.dimension, 'quantity', l.quantity,
        'state', l.state, 'attempts', l.attempts, 'record_id', l.record_id,
        'last_error', l.last_error)), '[]')
     FROM ledger l WHERE l.customer_id = c.id AND l.period = :period) AS entries,
  (SELECT coalesce(json_agg(json_build_array(b.dimension, b.carry::text)), '[]')
     FROM balances b WHERE b.customer_id = c.id) AS carries,
  (SELECT coalesce(json_agg(json_build_array(o.dimension, o.hour, o.rated::text)), '[]')
     FROM usage_observations o
    WHERE o.customer_id = c.id AND o.hour >= :window_start AND o.hour < :window_end) AS observed,
  -- the subject's plan spans (#13), which rate each hour of the look-back with its own plan
  (SELECT s.plans FROM subscription_state s WHERE s.customer_id = c.id) AS plans,
  (SELECT """
    + _superseded("s", ":period", ":window_end")
    + " OR "
    + _billed_by_legacy("s", ":period")
    + """
     FROM subscription_state s WHERE s.customer_id = c.id) AS superseded
FROM customers c WHERE c.id = :customer_id
"""
)

_DECIDE = Statement.of("""
WITH v AS (
  UPDATE customers SET billing_version = billing_version + 1
   WHERE id = :customer_id AND billing_version = :version RETURNING id
), l AS (
  INSERT INTO ledger (customer_id, period, dimension, quantity, state, rated, carry_in, carry_out,
                      run_id, attempts, lease_owner, lease_until)
  SELECT v.id, :period, d.dimension, d.quantity, d.state, d.rated, d.carry_in, d.carry_out,
         :run_id, d.attempts, CASE WHEN d.attempts > 0 THEN :owner END,
         CASE WHEN d.attempts > 0 THEN now() + :lease::interval END
    FROM v, unnest(:dimensions::text[], :quantities::bigint[], :states::text[], :rated::numeric[],
                   :carry_in::numeric[], :carry_out::numeric[], :attempts::int[])
            AS d(dimension, quantity, state, rated, carry_in, carry_out, attempts)
  RETURNING 1
), b AS (
  INSERT INTO balances (customer_id, dimension, carry)
  SELECT v.id, d.dimension, d.carry
    FROM v, unnest(:dimensions::text[], :carry_out::numeric[]) AS d(dimension, carry)
  ON CONFLICT (customer_id, dimension) DO UPDATE SET carry = excluded.carry, updated_at = now()
  RETURNING 1
), o AS (
  INSERT INTO usage_observations (customer_id, dimension, hour, rated)
  SELECT v.id, o.dimension, o.hour, o.rated
    FROM v, unnest(:observed_dimensions::text[], :observed_hours::timestamptz[], :observed_rated::numeric[])
            AS o(dimension, hour, rated)
  ON CONFLICT (customer_id, dimension, hour) DO UPDATE SET rated = excluded.rated
  RETURNING 1
)
SELECT (SELECT count(*) FROM v) AS decided, (SELECT count(*) FROM l) AS rows,
       (SELECT count(*) FROM b) AS balances, (SELECT count(*) FROM o) AS observations
""")


@dataclass(frozen=True)
class DecisionRows:
    """The decide statement's parameters, by name: one ledger row per dimension, observations per hour."""

    customer_id: str
    version: int
    period: datetime
    run_id: uuid.UUID
    owner: str
    lease: timedelta
    dimensions: list[str]
    quantities: list[int]
    states: list[str]
    rated: list[Decimal]
    carry_in: list[Decimal]
    carry_out: list[Decimal]
    attempts: list[int]
    observed_dimensions: list[str]
    observed_hours: list[datetime]
    observed_rated: list[Decimal]

    @classmethod
    def of(
        cls,
        state: CustomerHourState,
        message: BillMessageV1,
        decision: Decision,
        entry_states: Mapping[str, tuple[LedgerState, int]],
        owner: str,
        lease: timedelta,
    ) -> DecisionRows:
        dims = decision.dimensions
        obs = sorted(decision.observations.items())
        return cls(
            customer_id=state.customer.id,
            version=state.version,
            period=message.billing_period.start,
            run_id=message.run_id,
            owner=owner,
            lease=lease,
            dimensions=[d.dimension for d in dims],
            quantities=[d.quantity for d in dims],
            states=[LedgerState(entry_states[d.dimension][0]).value for d in dims],
            rated=[d.rated for d in dims],
            carry_in=[d.carry_in for d in dims],
            carry_out=[d.carry_out for d in dims],
            attempts=[entry_states[d.dimension][1] for d in dims],
            observed_dimensions=[dimension for (dimension, _), _ in obs],
            observed_hours=[hour for (_, hour), _ in obs],
            observed_rated=[rated for _, rated in obs],
        )

    def params(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Claim the hour's unfinished rows for one more submission. A row leased by another delivery is
# skipped (the lease condition is on the row itself, so Postgres re-checks it after a concurrent update).
_CLAIM = Statement.of("""
UPDATE ledger SET state = :state_submitted, attempts = attempts + 1, lease_owner = :owner,
                  -- still submitted here: the last attempt's answer was never recorded
                  unconfirmed = unconfirmed OR state = :state_submitted,
                  lease_until = now() + :lease::interval, updated_at = now()
 WHERE customer_id = :customer_id AND period = :period AND state = ANY(:states_unfinished::text[])
   AND (lease_until IS NULL OR lease_until < now() OR lease_owner = :owner)
RETURNING customer_id, dimension, quantity, state, attempts, record_id, last_error
""")

_RECORD = Statement.of("""
UPDATE ledger l SET state = r.state, record_id = coalesce(r.record_id, l.record_id), last_error = r.reason,
                    unconfirmed = l.unconfirmed OR r.state = :state_submitted,
                    -- the marketplace's answer proved it did not take the record
                    refused_attempts = l.refused_attempts + (r.state = ANY(:states_refused::text[]))::int,
                    lease_owner = NULL, lease_until = NULL, updated_at = now()
  FROM unnest(:dimensions::text[], :states::text[], :record_ids::text[], :reasons::text[])
       AS r(dimension, state, record_id, reason)
 WHERE l.customer_id = :customer_id AND l.period = :period AND l.dimension = r.dimension
   AND l.lease_owner = :owner
""")

# An hour outside the marketplace's window: rows every attempt of which was refused give their quantity
# back to the carried balance (billed with a later hour); rows that may have been received cannot (a
# submission unconfirmed, or an attempt without a refusal on record), and are rejected with a reason for
# an operator.
_EXPIRE = Statement.of("""
WITH e AS (
  UPDATE ledger
     SET state = CASE WHEN state = :state_submitted OR unconfirmed OR refused_attempts < attempts
                      THEN :state_rejected ELSE :state_expired END,
         last_error = CASE WHEN state = :state_submitted OR unconfirmed OR refused_attempts < attempts
                           THEN :unconfirmed_reason ELSE :carried_reason END,
         lease_owner = NULL, lease_until = NULL, updated_at = now()
   WHERE customer_id = :customer_id AND period = :period AND state = ANY(:states_unfinished::text[])
     AND (lease_until IS NULL OR lease_until < now() OR lease_owner = :owner)
  RETURNING dimension, quantity, state
), b AS (
  UPDATE balances b SET carry = b.carry + e.quantity, updated_at = now()
    FROM e WHERE b.customer_id = :customer_id AND b.dimension = e.dimension AND e.state = :state_expired
  RETURNING 1
), v AS (
  UPDATE customers SET billing_version = billing_version + 1
   WHERE id = :customer_id AND EXISTS (SELECT 1 FROM e) RETURNING 1
)
SELECT count(*) FROM e
""")

_RATE_CARD = Statement.of("SELECT marketplace, metric, dimension, factor, plan FROM rate_card")


class PostgresBillingRepository:
    """The biller's reads and writes: at most four round trips per customer-hour."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def load(
        self, customer_id: str, period: Period, window_start: datetime
    ) -> CustomerHourState | None:
        row = await self._pool.fetchrow(
            _LOAD.text,
            *_LOAD.args(
                customer_id=customer_id, period=period.start, window_start=window_start, window_end=period.end
            ),
        )
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
            plans=plan_spans(row["plans"]),
            superseded=bool(row["superseded"]),
        )

    async def record_decision(
        self,
        state: CustomerHourState,
        message: BillMessageV1,
        decision: Decision,
        entry_states: Mapping[str, tuple[LedgerState, int]],
        owner: str,
        lease: timedelta,
    ) -> bool:
        rows = DecisionRows.of(state, message, decision, entry_states, owner, lease)
        try:
            row = await self._pool.fetchrow(_DECIDE.text, *_DECIDE.args(**rows.params()))
        except asyncpg.exceptions.UniqueViolationError as exc:
            raise ConcurrentDecisionError("this hour was decided by a concurrent delivery") from exc
        assert row is not None
        return bool(row["decided"])

    async def claim(
        self, customer_id: str, period: Period, owner: str, lease: timedelta
    ) -> tuple[LedgerEntry, ...] | None:
        rows = await self._pool.fetch(
            _CLAIM.text, *_CLAIM.args(customer_id=customer_id, period=period.start, owner=owner, lease=lease)
        )
        if not rows:
            return None
        return tuple(_entry(r, period) for r in rows)

    async def record_results(
        self, customer_id: str, period: Period, owner: str, results: Sequence[SubmitResult]
    ) -> None:
        await self._pool.execute(
            _RECORD.text,
            *_RECORD.args(
                customer_id=customer_id,
                period=period.start,
                owner=owner,
                dimensions=[r.dimension for r in results],
                states=[r.state.value for r in results],
                record_ids=[r.record_id for r in results],
                reasons=[r.reason for r in results],
            ),
        )

    async def expire(self, customer_id: str, period: Period, owner: str, window: str) -> int:
        unconfirmed, carried = expiry_reasons(window)
        count = await self._pool.fetchval(
            _EXPIRE.text,
            *_EXPIRE.args(
                customer_id=customer_id,
                period=period.start,
                owner=owner,
                unconfirmed_reason=unconfirmed,
                carried_reason=carried,
            ),
        )
        return int(count)

    async def rate_card(self) -> RateCard:
        rows = await self._pool.fetch(_RATE_CARD.text)
        return RateCard(
            tuple(
                Rate(
                    Marketplace(r["marketplace"]),
                    r["metric"],
                    r["dimension"],
                    Decimal(r["factor"]),
                    r["plan"],
                )
                for r in rows
            )
        )


def plan_spans(plans: str | None) -> tuple[PlanSpan, ...]:
    """subscription_state.plans (jsonb, as text) as the domain's spans; none for a customer that is not
    a subscription's subject (seeded or imported without a plan: the default plan)."""
    return tuple(
        PlanSpan(
            start=_parse_ts(p["start"]),
            plan=p.get("plan"),
            dimensions=tuple(p["dimensions"]) if p.get("dimensions") is not None else None,
            quantity=p.get("quantity"),
        )
        for p in json.loads(plans or "[]")
    )


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


# keyset pages of the customers billable in an hour: never decided, or with rows still unfinished
_TO_BILL = Statement.of(
    """
SELECT c.id, c.marketplace FROM customers c
  LEFT JOIN subscription_state s ON s.customer_id = c.id
 WHERE c.id > :after
   -- a subject the marketplaces manage (#13): billed for an hour it was ACTIVE during (a suspension's
   -- hours and every hour after its end are not); a seeded customer without a subscription: its status
   -- and active range, as before
   AND CASE WHEN s.customer_id IS NOT NULL THEN s.billable && tstzrange(:period, :period_end)
            ELSE c.status = :active AND c.active_from < :period_end
                 AND (c.active_until IS NULL OR c.active_until > :period) END
   AND NOT coalesce("""
    + _superseded("s", ":period", ":period_end")
    + """, false)
   AND (NOT EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = :period)
        OR EXISTS (SELECT 1 FROM ledger l WHERE l.customer_id = c.id AND l.period = :period
                      AND l.state = ANY(:states_unfinished::text[])))
 ORDER BY c.id LIMIT :page_size
"""
)


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

    async def customers_to_bill(
        self, period: Period, page_size: int
    ) -> AsyncIterator[list[tuple[str, Marketplace]]]:
        """Keyset pages of the customers billable in the hour whose bill is not finished, with the
        marketplace whose lane bills them."""
        after = ""
        while True:
            rows = await self._pool.fetch(
                _TO_BILL.text,
                *_TO_BILL.args(
                    after=after,
                    period=period.start,
                    period_end=period.end,
                    page_size=page_size,
                    active=CustomerStatus.ACTIVE.value,
                ),
            )
            if not rows:
                return
            yield [(r["id"], Marketplace(r["marketplace"])) for r in rows]
            after = rows[-1]["id"]

    async def finish_run(self, run_id: uuid.UUID, dispatched: int) -> None:
        await self._pool.execute(
            "UPDATE billing_runs SET dispatched = $2, dispatched_at = now() WHERE id = $1", run_id, dispatched
        )

    async def record_resend(self, run_id: uuid.UUID, resent: int) -> None:
        await self._pool.execute("UPDATE billing_runs SET resent = resent + $2 WHERE id = $1", run_id, resent)


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
