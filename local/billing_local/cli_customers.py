"""`billing customers list|show ID|history ID|import FILE.csv`: the billing subjects as an operator sees them.

A subject is what a marketplace's lifecycle events (or ``import``) made: a row of ``subscription_state``,
linked to the ``customers`` row it bills as. ``billing seed`` (and any customer written with SQL) writes
``customers`` rows only, with no subject and no history: list and show include them too, marked "no
subject", so every customer that `billing run` bills and `billing reconcile` finds can be looked up here.

``import`` bulk-loads subjects a seller already has on the marketplaces: every row is validated first
(and folded exactly as marketplace events would be); if any row is rejected, the report lists them all
and nothing is written; otherwise every row is recorded in one transaction (all or nothing). Each row
becomes ``import`` events with ids derived from the row's subject, so importing the same file twice
changes nothing.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path  # typer reads the annotations at run time
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from billing.domain.model import Marketplace
from billing.domain.subscriptions import (
    EventSource,
    Identity,
    LifecycleEvent,
    LifecycleKind,
    SubjectKey,
    fold,
)
from billing_local.errors import Failure

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    import asyncpg

_T = TypeVar("_T")

console = Console(soft_wrap=True)  # a line is whole at any width: it is read and grepped
errors = Console(stderr=True, soft_wrap=True)
customers_app = typer.Typer(
    no_args_is_help=True, help="Billing subjects and their history.", pretty_exceptions_show_locals=False
)

_ID_HELP = "Customer (tenant) id or marketplace subject id."
_TENANT = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # the customers.id alphabet
_IDENTITY = {f.name for f in fields(Identity)}
CSV_COLUMNS = (
    "marketplace",
    "subject_id",
    "tenant_id",
    "active_from",
    "ended_at",
    "plan",
    "quantity",
    *sorted(_IDENTITY),
)


def register(app: typer.Typer) -> None:
    app.add_typer(customers_app, name="customers")


def _dsn() -> str:
    from billing.bootstrap import database_dsn
    from billing.config import load_settings

    return database_dsn(load_settings())


async def _with_pool(call: Callable[[asyncpg.Pool], Awaitable[_T]]) -> _T:
    from billing.adapters.postgres import create_pool
    from billing.adapters.postgres_tls import database_tls
    from billing.config import load_settings

    # TLS verified as the functions verify it: an operator may point this at the production database
    pool = await create_pool(_dsn(), 2, database_tls(load_settings()))
    try:
        return await call(pool)
    finally:
        await pool.close()


async def _repo_call(method: str, *args: Any) -> Any:
    from billing.adapters.postgres_subscriptions import PostgresSubscriptionRepository

    return await _with_pool(lambda pool: getattr(PostgresSubscriptionRepository(pool), method)(*args))


NO_SUBJECT = "no subject: a customers row written directly (`billing seed`, SQL), no marketplace events"
# customers rows no subject links to: what `billing seed` writes; shaped like SubjectRow for list/show
_DIRECT_CUSTOMERS = """
SELECT c.marketplace, c.id AS customer_id, c.status, c.active_until AS ends_at, c.created_at AS updated_at,
       tstzrange(c.active_from, c.active_until)::text AS billable,
       jsonb_strip_nulls(jsonb_build_object(
           'aws_customer_identifier', c.aws_customer_identifier, 'aws_account_id', c.aws_account_id,
           'aws_product_code', c.aws_product_code, 'gcp_usage_reporting_id', c.gcp_usage_reporting_id,
           'gcp_service_name', c.gcp_service_name, 'azure_resource_id', c.azure_resource_id,
           'azure_resource_uri', c.azure_resource_uri, 'azure_plan_id', c.azure_plan_id))::text AS identity
FROM customers c
WHERE NOT EXISTS (SELECT 1 FROM subscription_state s WHERE s.customer_id = c.id)
"""


def _direct(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "marketplace": r["marketplace"],
        "subject_id": None,
        "customer_id": r["customer_id"],
        "tenant_id": None,
        "status": r["status"],
        "ends_at": r["ends_at"],
        "billable": r["billable"],
        "plans": [],
        "identity": json.loads(r["identity"]),
        "link_problem": None,
        "events": 0,
        "updated_at": r["updated_at"],
        "note": NO_SUBJECT,
    }


async def _direct_customers(marketplace: str | None, limit: int = 1000) -> list[dict[str, Any]]:
    rows = await _with_pool(
        lambda pool: pool.fetch(
            _DIRECT_CUSTOMERS + " AND ($1::text IS NULL OR c.marketplace = $1) ORDER BY c.marketplace, c.id"
            " LIMIT $2",
            marketplace,
            limit,
        )
    )
    return [_direct(r) for r in rows]


async def _direct_customer(ident: str) -> dict[str, Any] | None:
    row = await _with_pool(lambda pool: pool.fetchrow(_DIRECT_CUSTOMERS + " AND c.id = $1", ident))
    return _direct(row) if row is not None else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@customers_app.command("list")
def list_command(
    marketplace: Annotated[
        Marketplace | None, typer.Option(help="Only this marketplace's.", case_sensitive=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    limit: Annotated[
        int, typer.Option(min=1, help="At most this many subjects, and as many customers without one.")
    ] = 1000,
) -> None:
    """Every subject (marketplace, subject id, the tenant it bills as, status, billable span), and every
    customer written without one (`billing seed`), marked "no subject"."""
    market = marketplace.value if marketplace is not None else None

    async def read() -> tuple[list[dict[str, Any]], bool]:
        # one more than shown of each: whether the listing was cut is said, never silently
        subjects = [asdict(r) for r in await _repo_call("subjects", market, limit + 1)]
        direct = await _direct_customers(market, limit + 1)
        cut = len(subjects) > limit or len(direct) > limit
        return subjects[:limit] + direct[:limit], cut

    found, cut = asyncio.run(read())
    rows = sorted(found, key=lambda r: (r["marketplace"], r["customer_id"] or "", r["subject_id"] or ""))
    if cut:
        typer.echo(
            f"more than {limit} subjects or customers without one: the first {limit} of each are listed"
            " (--limit N to list more)",
            err=True,
        )
    if as_json:
        print(json.dumps([_jsonable(r) for r in rows], indent=2))
        return
    if not rows:
        where = f" on {market}" if market else ""
        console.print(
            f"no subjects or customers{where}: `billing seed` writes demo customers, marketplace events"
            " and `billing customers import` write subjects"
        )
        return
    table = Table("marketplace", "subject", "customer (tenant)", "status", "billable", "ends", "problem")
    for r in rows:
        table.add_row(
            r["marketplace"],
            escape(r["subject_id"] or "(no subject)"),
            escape(r["customer_id"] or "-"),
            r["status"],
            escape(r["billable"]),
            r["ends_at"].isoformat() if r["ends_at"] else "",
            escape(r["link_problem"] or ""),
        )
    console.print(table)
    direct = sum(1 for r in rows if r["subject_id"] is None)
    if direct:
        console.print(f"{direct} of {len(rows)}: {NO_SUBJECT}")


def _unknown(ident: str) -> Failure:
    return Failure(f"no subject or customer {ident!r}: `billing customers list` shows them")


@customers_app.command("show")
def show_command(
    ident: Annotated[
        str, typer.Argument(metavar="ID", help="Customer (tenant) id or marketplace subject id.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """One subject's state: identity, plans, billable span, why it is not billed (if it is not)."""

    async def read() -> dict[str, Any] | None:
        subject = await _repo_call("subject", ident)
        return asdict(subject) if subject is not None else await _direct_customer(ident)

    row = asyncio.run(read())
    if row is None:
        raise _unknown(ident)
    doc = _jsonable(row)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    for key, value in doc.items():
        console.print(
            f"[bold]{key}[/bold]: {escape(json.dumps(value) if not isinstance(value, str) else value)}"
        )


@customers_app.command("history")
def history_command(
    ident: Annotated[
        str, typer.Argument(metavar="ID", help="Customer (tenant) id or marketplace subject id.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Every event the marketplaces sent about the subject, in the order received (append-only)."""

    async def read() -> tuple[Any, list[Any], bool]:
        subject = await _repo_call("subject", ident)
        if subject is None:
            return None, [], await _direct_customer(ident) is not None
        return subject, await _repo_call("history", subject.marketplace, subject.subject_id), False

    subject, events, direct = asyncio.run(read())
    if direct:
        if as_json:
            print("[]")
            return
        console.print(f"customer {escape(ident)} has no history: {NO_SUBJECT}")
        return
    if subject is None:
        raise _unknown(ident)
    if as_json:
        print(json.dumps([_jsonable(asdict(e)) for e in events], indent=2))
        return
    table = Table(
        "#", "received", "kind", "effective", "marketplace time", "source", "event id", "tenant", "plan"
    )
    for e in events:
        table.add_row(
            str(e.id),
            e.received_at.isoformat(timespec="seconds"),
            e.kind,
            e.effective_at.isoformat(),
            e.ordering.isoformat(),
            e.source,
            escape(e.event_id),
            escape(e.tenant_id or ""),
            escape(e.plan or ""),
        )
    console.print(
        f"{subject.marketplace}:{escape(subject.subject_id)} (customer {escape(subject.customer_id or '-')})"
    )
    console.print(table)


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str


def _time(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what}: not an ISO-8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"{what}: needs a timezone (e.g. Z)")
    return moment


def parse_row(row: dict[str, str]) -> list[LifecycleEvent]:
    """The events a CSV row means, or ValueError saying what is wrong with it."""
    from billing.adapters.postgres_subscriptions import customer_columns

    unknown = set(row) - set(CSV_COLUMNS)
    if unknown:
        raise ValueError(f"unknown columns: {', '.join(sorted(unknown))}")
    value = {k: (v or "").strip() for k, v in row.items()}
    try:
        market = Marketplace(value.get("marketplace", ""))
    except ValueError:
        raise ValueError("marketplace must be aws, gcp or azure") from None
    key = SubjectKey(market, value.get("subject_id") or "")
    tenant = value.get("tenant_id", "")
    if not _TENANT.match(tenant):
        raise ValueError("tenant_id must be 1 to 128 of A-Z a-z 0-9 . _ : -")
    start = _time(value.get("active_from", ""), "active_from")
    quantity = value.get("quantity")
    if quantity and not quantity.isdigit():
        raise ValueError("quantity must be a whole number")
    identity = Identity(**{k: value[k] for k in _IDENTITY if value.get(k)})
    base = f"import:{market}:{key.subject_id}"
    events = [
        LifecycleEvent(
            key=key,
            kind=LifecycleKind.ACTIVE,
            effective_at=start,
            ordering=start,
            event_id=f"{base}:active",
            source=EventSource.IMPORT,
            plan=value.get("plan") or None,
            quantity=int(quantity) if quantity else None,
            tenant_id=tenant,
            identity=identity,
            raw={k: v for k, v in value.items() if v},
        )
    ]
    if value.get("ended_at"):
        end = _time(value["ended_at"], "ended_at")
        if end <= start:
            raise ValueError("ended_at must be after active_from")
        events.append(
            LifecycleEvent(
                key=key,
                kind=LifecycleKind.ENDED,
                effective_at=end,
                ordering=end,
                event_id=f"{base}:ended",
                source=EventSource.IMPORT,
                raw={"ended_at": value["ended_at"]},
            )
        )
    problem = customer_columns(fold(key, events))
    if isinstance(problem, str):
        raise ValueError(problem)
    return events


def validate(path: Path) -> tuple[list[LifecycleEvent], list[Rejected], int]:
    """Every row's events, the rejected rows, and the number of rows."""
    events: list[LifecycleEvent] = []
    rejected: list[Rejected] = []
    seen: dict[tuple[str, str], int] = {}
    tenants: dict[str, int] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        unknown = sorted(set(reader.fieldnames or ()) - set(CSV_COLUMNS))
        if unknown:
            # the header is line 1: reported once there, not again for every row
            known = ", ".join(CSV_COLUMNS)
            rows = sum(1 for _ in reader)
            return [], [Rejected(1, f"unknown columns: {', '.join(unknown)} (known: {known})")], rows
        rows = 0
        for line, row in enumerate(reader, start=2):
            rows += 1
            try:
                row_events = parse_row(row)
            except ValueError as exc:
                rejected.append(Rejected(line, str(exc)))
                continue
            subject = (row_events[0].key.marketplace.value, row_events[0].key.subject_id)
            tenant = row_events[0].tenant_id or ""
            if subject in seen:
                rejected.append(Rejected(line, f"subject repeated (first on line {seen[subject]})"))
                continue
            if tenant in tenants:
                rejected.append(Rejected(line, f"tenant {tenant} repeated (first on line {tenants[tenant]})"))
                continue
            seen[subject], tenants[tenant] = line, line
            events += row_events
    return events, rejected, rows


IMPORT_HELP = "\n\n".join(
    (
        "Load subjects from a CSV; all rows or none. Exit 1 if any is rejected.",
        "The first line is the header: any of the columns " + ", ".join(CSV_COLUMNS) + ".",
        "Required: marketplace (aws, gcp or azure), subject_id, tenant_id (the customer id it bills as),"
        " active_from (ISO-8601 with a timezone, e.g. 2026-11-01T00:00:00Z) and the marketplace's"
        " identity columns: aws_account_id + aws_license_arn, or aws_customer_identifier +"
        " aws_product_code; gcp_usage_reporting_id + gcp_service_name; azure_subscription_id or"
        " azure_resource_uri, and plan. Optional: ended_at, plan (other marketplaces), quantity (a whole"
        " number), aws_agreement_id, gcp_entitlement_id, gcp_account_id.",
    )
)


@customers_app.command("import", help=IMPORT_HELP, short_help="Load subjects from a CSV; all rows or none.")
def import_command(
    file: Annotated[Path, typer.Argument(metavar="FILE.csv", exists=True, dir_okay=False, readable=True)],
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Load subjects from a CSV; all rows or none. Exit 1 if any is rejected."""
    events, rejected, rows = validate(file)
    written: list[Any] = []
    if not rejected:
        try:
            written = asyncio.run(_repo_call("record_all", events))
        except Exception as exc:  # the database refused a row (a constraint): nothing was written
            rejected.append(Rejected(0, f"the database refused the import: {type(exc).__name__}: {exc}"))
    problems = [r for r in written if r.link_problem]
    report = {
        "rows": rows,
        "imported": rows if not rejected else 0,
        "events_appended": sum(r.appended for r in written),
        "rejected": [asdict(r) for r in rejected],
        "not_billed": [{"subject": str(r.state.key), "reason": r.link_problem} for r in problems],
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for r in rejected:
            errors.print(f"line {r.line}: {escape(r.reason)}")
        for p in report["not_billed"]:
            errors.print(f"not billed: {escape(p['subject'])}: {escape(p['reason'] or '')}")
        verdict = "nothing written" if rejected else "all written"
        console.print(f"{rows} row{'' if rows == 1 else 's'}, {len(rejected)} rejected: {verdict}")
    if rejected:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(customers_app())
