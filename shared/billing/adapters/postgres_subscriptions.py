"""Subscriptions in PostgreSQL: the append-only history, the folded state, and the customers row.

One transaction per event: lock the subject's state row, append the event (deduplicated by the
marketplace's event id), fold the whole history again (billing.domain.subscriptions), write the state
and, once the subject is linked to a tenant and its identity is complete, its customers row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from billing.domain.model import FINAL_STATES, Marketplace
from billing.domain.subscriptions import (
    EventSource,
    Identity,
    LifecycleEvent,
    LifecycleKind,
    SubjectKey,
    SubscriptionState,
    SubscriptionStatus,
    fold,
)
from billing.ports import Recorded

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import asyncpg

_IDENTITY_FIELDS = frozenset(f.name for f in fields(Identity))


@dataclass(frozen=True)
class SubjectRow:
    """A subject as an operator sees it (`billing customers list|show`)."""

    marketplace: str
    subject_id: str
    customer_id: str | None
    tenant_id: str | None
    status: str
    ends_at: datetime | None
    billable: str
    plans: list[dict[str, Any]]
    identity: dict[str, str]
    link_problem: str | None
    events: int
    updated_at: datetime


@dataclass(frozen=True)
class HistoryRow:
    id: int
    event_id: str
    kind: str
    source: str
    effective_at: datetime
    ordering: datetime
    plan: str | None
    quantity: int | None
    tenant_id: str | None
    received_at: datetime
    raw: Any


def _event_from_row(row: Mapping[str, Any]) -> LifecycleEvent:
    identity = json.loads(row["identity"]) if row["identity"] else {}
    return LifecycleEvent(
        key=SubjectKey(Marketplace(row["marketplace"]), row["subject_id"]),
        kind=LifecycleKind(row["kind"]),
        effective_at=row["effective_at"],
        ordering=row["ordering"],
        event_id=row["event_id"],
        source=EventSource(row["source"]),
        sequence=int(row["sequence"]),
        plan=row["plan"],
        dimensions=tuple(row["dimensions"]) if row["dimensions"] is not None else None,
        quantity=row["quantity"],
        tenant_id=row["tenant_id"],
        identity=Identity(**{k: v for k, v in identity.items() if k in _IDENTITY_FIELDS}),
        raw=json.loads(row["raw"]) if row["raw"] is not None else None,
    )


def multirange_literal(state: SubscriptionState) -> str:
    """The billable intervals as a tstzmultirange literal: ``{[a,b),[c,)}``."""
    parts = []
    for start, end in state.billable_intervals:
        upper = f'"{end.isoformat()}"' if end else ""
        parts.append(f'["{start.isoformat()}",{upper})')
    return "{" + ",".join(parts) + "}"


def customer_columns(state: SubscriptionState) -> dict[str, Any] | str:
    """The customers row's marketplace columns for the subject, or why it cannot be billed yet."""
    ident = state.identity
    current = state.plans[-1] if state.plans else None
    cols: dict[str, Any] = {}
    market = state.key.marketplace
    if market is Marketplace.AWS:
        if ident.aws_license_arn:
            if not ident.aws_account_id:
                return "AWS license without CustomerAWSAccountId"
            cols = {"aws_license_arn": ident.aws_license_arn, "aws_account_id": ident.aws_account_id}
        elif ident.aws_customer_identifier and ident.aws_product_code:
            cols = {
                "aws_customer_identifier": ident.aws_customer_identifier,
                "aws_product_code": ident.aws_product_code,
            }
        else:
            return "AWS identity incomplete (LicenseArn + account id, or CustomerIdentifier + ProductCode)"
    elif market is Marketplace.GCP:
        if not (ident.gcp_usage_reporting_id and ident.gcp_service_name):
            return "Google identity incomplete (usageReportingId and service name)"
        cols = {
            "gcp_usage_reporting_id": ident.gcp_usage_reporting_id,
            "gcp_service_name": ident.gcp_service_name,
        }
    else:
        plan = current.plan if current else None
        if not plan or not (ident.azure_subscription_id or ident.azure_resource_uri):
            return "Azure identity incomplete (subscription id or resourceUri, and plan)"
        cols = {
            "azure_resource_id": ident.azure_subscription_id if not ident.azure_resource_uri else None,
            "azure_resource_uri": ident.azure_resource_uri,
            "azure_plan_id": plan,
        }
    return cols


_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def default_tenant(state: SubscriptionState) -> str:
    """The tenant id of a subject no registration linked: stable per subject, in the customer id alphabet.
    AWS's matches the fulfillment-URL registration's own default (aws_subscriptions.derived_tenant_id)."""
    ident, key = state.identity, state.key
    if key.marketplace is Marketplace.AWS and ident.aws_license_arn and ident.aws_account_id:
        raw = f"aws-{ident.aws_account_id}-{key.subject_id}"
    elif key.marketplace is Marketplace.AWS and ident.aws_customer_identifier:
        raw = f"aws-{ident.aws_customer_identifier}"
    else:
        raw = f"{key.marketplace.value}-{key.subject_id}"
    return _UNSAFE.sub("_", raw)[:128]


_CUSTOMER_STATUS = {
    SubscriptionStatus.ACTIVE: "active",
    SubscriptionStatus.SUSPENDED: "suspended",
    SubscriptionStatus.ENDED: "cancelled",
    SubscriptionStatus.PENDING: "suspended",
}
_ALL_IDENTITY_COLUMNS = (
    "aws_customer_identifier",
    "aws_account_id",
    "aws_product_code",
    "aws_license_arn",
    "gcp_usage_reporting_id",
    "gcp_service_name",
    "azure_resource_id",
    "azure_resource_uri",
    "azure_plan_id",
)

_EVENT_COLUMNS = (
    "marketplace, subject_id, event_id, kind, source, effective_at, ordering, sequence, plan, dimensions,"
    " quantity, tenant_id, identity, raw"
)


class PostgresSubscriptionRepository:
    """The Subscriptions function's reads and writes, and the operator's views."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, event: LifecycleEvent) -> Recorded:
        """Append the event (once) and bring the subject's state and customers row up to date."""
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._record(conn, event)

    async def record_all(self, events: Sequence[LifecycleEvent]) -> list[Recorded]:
        """Every event in one transaction: all recorded, or (on any error) none (an import)."""
        async with self._pool.acquire() as conn, conn.transaction():
            return [await self._record(conn, event) for event in events]

    async def _record(self, conn: asyncpg.Connection, event: LifecycleEvent) -> Recorded:
        key = event.key
        await conn.execute(
            "INSERT INTO subscription_state (marketplace, subject_id, status) VALUES ($1, $2, 'pending')"
            " ON CONFLICT DO NOTHING",
            key.marketplace.value,
            key.subject_id,
        )
        # one writer per subject at a time: the fold below sees every event committed before it
        linked = await conn.fetchval(
            "SELECT customer_id FROM subscription_state WHERE marketplace = $1 AND subject_id = $2"
            " FOR UPDATE",
            key.marketplace.value,
            key.subject_id,
        )
        appended = await conn.fetchval(
            f"INSERT INTO subscription_events ({_EVENT_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14::jsonb)"
            " ON CONFLICT (marketplace, event_id) DO NOTHING RETURNING id",
            key.marketplace.value,
            key.subject_id,
            event.event_id,
            event.kind.value,
            event.source.value,
            event.effective_at,
            event.ordering,
            event.sequence,
            event.plan,
            list(event.dimensions) if event.dimensions is not None else None,
            event.quantity,
            event.tenant_id,
            json.dumps(event.identity.as_dict()),
            json.dumps(event.raw) if event.raw is not None else None,
        )
        rows = await conn.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM subscription_events"
            " WHERE marketplace = $1 AND subject_id = $2 ORDER BY id",
            key.marketplace.value,
            key.subject_id,
        )
        state = fold(key, [_event_from_row(r) for r in rows])
        customer_id, problem, drop = await self._link(conn, state, linked)
        await conn.execute(
            """
            UPDATE subscription_state
               SET customer_id = $3, tenant_id = $4, status = $5, billable = $6::text::tstzmultirange,
                   ends_at = $7, plans = $8::jsonb, identity = $9::jsonb, link_problem = $10,
                   events = $11, updated_at = now()
             WHERE marketplace = $1 AND subject_id = $2
            """,
            key.marketplace.value,
            key.subject_id,
            customer_id,
            state.tenant_id,
            state.status.value,
            multirange_literal(state),
            state.ends_at,
            json.dumps(
                [
                    {
                        "start": p.start.isoformat(),
                        "plan": p.plan,
                        "dimensions": list(p.dimensions) if p.dimensions is not None else None,
                        "quantity": p.quantity,
                    }
                    for p in state.plans
                ]
            ),
            json.dumps(state.identity.as_dict()),
            problem,
            len(rows),
        )
        if drop is not None:  # relinked before any bill: the default tenant's row goes
            await conn.execute("DELETE FROM balances WHERE customer_id = $1", drop)
            await conn.execute("DELETE FROM customers WHERE id = $1", drop)
        return Recorded(state, appended is not None, customer_id, problem)

    async def _link(
        self, conn: asyncpg.Connection, state: SubscriptionState, linked: str | None
    ) -> tuple[str | None, str | None, str | None]:
        """Write the subject's customers row (its id is the tenant id) when it can be billed.

        Returns (customer id, problem, a previous customer id to drop). The tenant is the one a
        registration named, else :func:`default_tenant`. A registration naming another tenant after the
        subject was linked to its default moves the link while nothing has been billed yet; after that
        the link stays (the ledger's rows are the default tenant's) and the conflict is reported.
        """
        explicit = state.tenant_id
        target = linked or explicit or default_tenant(state)
        problem: str | None = None
        drop: str | None = None
        if linked is not None and explicit is not None and explicit != linked:
            billed = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM ledger WHERE customer_id = $1)", linked
            )
            if billed:
                problem = f"a registration names tenant {explicit}, but {linked} has been billed already"
            else:
                target, drop = explicit, linked
        intervals = state.billable_intervals
        if not intervals:
            return linked, "never active yet", None
        cols = customer_columns(state)
        if isinstance(cols, str):
            return linked, cols, None
        if target != linked:
            owner = await conn.fetchrow(
                "SELECT c.id, s.marketplace, s.subject_id FROM customers c"
                " LEFT JOIN subscription_state s ON s.customer_id = c.id WHERE c.id = $1",
                target,
            )
            if owner is not None:
                other = f"{owner['marketplace']}:{owner['subject_id']}" if owner["subject_id"] else "seeded"
                return linked, f"tenant {target} is already billed as another subject ({other})", None
        values = {c: cols.get(c) for c in _ALL_IDENTITY_COLUMNS}
        await conn.execute(
            f"""
            INSERT INTO customers (id, marketplace, status, active_from, active_until,
                                   {", ".join(_ALL_IDENTITY_COLUMNS)})
            VALUES ($1, $2, $3, $4, $5, {", ".join(f"${i}" for i in range(6, 6 + len(values)))})
            ON CONFLICT (id) DO UPDATE SET status = excluded.status, active_from = excluded.active_from,
                active_until = excluded.active_until,
                {", ".join(f"{c} = excluded.{c}" for c in _ALL_IDENTITY_COLUMNS)}
            """,
            target,
            state.key.marketplace.value,
            _CUSTOMER_STATUS[state.status],
            intervals[0][0],
            state.ends_at,
            *values.values(),
        )
        return target, problem, drop

    async def subjects(self, marketplace: str | None = None, limit: int = 1000) -> list[SubjectRow]:
        rows = await self._pool.fetch(
            "SELECT *, billable::text AS billable_text FROM subscription_state"
            " WHERE $1::text IS NULL OR marketplace = $1 ORDER BY marketplace, subject_id LIMIT $2",
            marketplace,
            limit,
        )
        return [_subject(r) for r in rows]

    async def subject(self, ident: str) -> SubjectRow | None:
        """A subject by its tenant/customer id, or by its marketplace subject id."""
        row = await self._pool.fetchrow(
            "SELECT *, billable::text AS billable_text FROM subscription_state"
            " WHERE customer_id = $1 OR subject_id = $1 ORDER BY customer_id = $1 DESC LIMIT 1",
            ident,
        )
        return _subject(row) if row else None

    async def finished_hours(self, customer_id: str, start: datetime, end: datetime) -> set[datetime]:
        rows = await self._pool.fetch(
            "SELECT period FROM ledger WHERE customer_id = $1 AND period BETWEEN $2 AND $3"
            " GROUP BY period HAVING bool_and(state = ANY($4::text[]))",
            customer_id,
            start,
            end,
            [s.value for s in FINAL_STATES],
        )
        return {r["period"] for r in rows}

    async def license_for_agreement(self, agreement_id: str) -> str | None:
        """The license ARN an AWS agreement's earlier events or registration named (agreement events
        name only the agreement)."""
        value = await self._pool.fetchval(
            "SELECT identity->>'aws_license_arn' FROM subscription_events"
            " WHERE marketplace = 'aws' AND identity->>'aws_agreement_id' = $1"
            " AND identity ? 'aws_license_arn' ORDER BY id DESC LIMIT 1",
            agreement_id,
        )
        return str(value) if value is not None else None

    async def history(self, marketplace: str, subject_id: str) -> list[HistoryRow]:
        rows = await self._pool.fetch(
            "SELECT id, event_id, kind, source, effective_at, ordering, plan, quantity, tenant_id,"
            " received_at, raw FROM subscription_events WHERE marketplace = $1 AND subject_id = $2"
            " ORDER BY id",
            marketplace,
            subject_id,
        )
        return [
            HistoryRow(
                id=r["id"],
                event_id=r["event_id"],
                kind=r["kind"],
                source=r["source"],
                effective_at=r["effective_at"],
                ordering=r["ordering"],
                plan=r["plan"],
                quantity=r["quantity"],
                tenant_id=r["tenant_id"],
                received_at=r["received_at"],
                raw=json.loads(r["raw"]) if r["raw"] is not None else None,
            )
            for r in rows
        ]


def _subject(r: Mapping[str, Any]) -> SubjectRow:
    return SubjectRow(
        marketplace=r["marketplace"],
        subject_id=r["subject_id"],
        customer_id=r["customer_id"],
        tenant_id=r["tenant_id"],
        status=r["status"],
        ends_at=r["ends_at"],
        billable=r["billable_text"],
        plans=json.loads(r["plans"]),
        identity=json.loads(r["identity"]),
        link_problem=r["link_problem"],
        events=r["events"],
        updated_at=r["updated_at"],
    )


def events_for_import(events: Sequence[LifecycleEvent]) -> list[LifecycleEvent]:
    """The order an import records its events in (the marketplace's own, for readable histories)."""
    return sorted(events, key=lambda e: e.sort_key)
