"""Elastic APM touch points: named spans, labels and explicit outcomes (no-ops outside a transaction)."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import elasticapm
from elasticapm.contrib.serverless import aws as aws_serverless
from elasticapm.contrib.serverless.aws import prep_kwargs
from elasticapm.instrumentation.packages.asyncio import asyncpg as instrumented_asyncpg
from elasticapm.traces import execution_context

from billing.domain.model import LedgerState

if TYPE_CHECKING:
    from elasticapm.traces import capture_span as CaptureSpan

    from billing.domain.messages import BillMessageV1
    from billing.domain.model import BillOutcome


class LeanClient(elasticapm.Client):  # type: ignore[misc]
    """The agent's Client, minus the stack walk at every span start when span stack traces are off.

    elasticapm 6.26 collects the caller's frames (up to ``stack_trace_limit``) whenever a span
    begins, through the collector its Tracer is built with, and drops them when the span ends if
    ``span_stack_trace_min_duration`` is negative: the walk is wasted, about a quarter of the agent's
    CPU per bill (bench/profile.py). With span stack traces off (template.yaml, the runner), this
    client gives the Tracer a collector that collects nothing. Error events do not use it: their
    stack trace comes from the exception's traceback. The setting is read once, here (central
    configuration is off in Lambda and in the runner).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.tracer.span_stack_trace_min_duration < timedelta(0):
            self.tracer.frames_collector_func = _no_frames

    def get_system_info(self) -> dict[str, Any]:
        """The agent's system metadata (host name, architecture, container and Kubernetes ids), read once.

        elasticapm 6.26 rebuilds it at every ``build_metadata``, twice per Lambda invocation (the
        transaction's registration with the extension, the metadata of the flush), each time reading
        /proc/self/cgroup and parsing it: about 0.1 ms of CPU for values fixed for the process's life.
        It depends on nothing else than the APM Server's version (below 7.4 it adds ``hostname``).
        A copy is returned: the agent merges the Lambda metadata into what it is given.
        """
        cached: tuple[Any, dict[str, Any]] | None = getattr(self, "_lean_system_info", None)
        if cached is None or cached[0] != self.server_version:
            cached = (self.server_version, super().get_system_info())
            self._lean_system_info = cached
        return dict(cached[1])


def _no_frames() -> None:
    return None


def _remember_sql_signatures() -> None:
    """Name each SQL span from a memo of its statement's signature ("SELECT FROM ledger").

    The agent's asyncpg instrumentation tokenizes the whole statement, character by character in
    Python, at every query to find that name: about 0.23 ms of CPU per bill for the four statements,
    whose texts never change (bench/profile.py). The signature is a pure function of the text, so a
    memo gives the same name; the span still carries the statement itself.
    """
    signature = instrumented_asyncpg.extract_signature
    if not hasattr(signature, "cache_info"):
        instrumented_asyncpg.extract_signature = functools.lru_cache(maxsize=256)(signature)


_remember_sql_signatures()


def lambda_agent(*, register_transactions: bool) -> elasticapm.Client:
    """The process's agent, built as ``capture_serverless`` builds it (which then uses this one).

    ``register_transactions`` (Settings.apm_register_transactions): whether ``capture_serverless``
    registers each transaction with the APM extension as the invocation starts. elasticapm 6.26 has
    no setting for it, only the module flag it clears itself when the extension refuses one.
    """
    aws_serverless.REGISTER_PARTIAL_TRANSACTIONS = register_transactions
    client: elasticapm.Client | None = elasticapm.get_client()
    return client if client is not None else LeanClient(**prep_kwargs())


def span(name: str, span_type: str = "app", subtype: str | None = None) -> CaptureSpan:
    """A named span for a domain step (rating, ledger write) inside the current transaction."""
    return elasticapm.capture_span(name, span_type=span_type, span_subtype=subtype, leaf=False)


def _active() -> bool:
    """Outside a transaction the agent would log "No transaction currently active" for each call."""
    return execution_context.get_transaction() is not None


def label_message(message: BillMessageV1) -> None:
    if not _active():
        return
    elasticapm.label(
        billing_hour=message.billing_period.isoformat(),
        run_id=str(message.run_id),
        customer_id=message.customer_id,
    )


def record_success(outcome: BillOutcome) -> None:
    """The agent leaves outcome and result empty for non-HTTP triggers: set both."""
    if not _active():
        return
    elasticapm.label(marketplace=outcome.marketplace.value)
    elasticapm.set_transaction_outcome("success", override=False)
    # the invocation worked, but a record the marketplace refused is money not collected: the result
    # and a label say so, and the local timeline marks the customer (billing_local.timeline)
    rejected = outcome.count(LedgerState.REJECTED)
    if rejected:
        elasticapm.label(records_rejected=rejected)
    result = "already billed" if outcome.already_billed else "rejected" if rejected else "billed"
    elasticapm.set_transaction_result(result, override=False)


def record_failure(exc: BaseException) -> None:
    if not _active():
        return
    client = elasticapm.get_client()
    if client is not None:
        client.capture_exception(exc_info=(type(exc), exc, exc.__traceback__), handled=True)
    elasticapm.set_transaction_outcome("failure", override=True)
    elasticapm.set_transaction_result(type(exc).__name__, override=True)


def correlation_ids() -> dict[str, Any]:
    """ECS log-correlation fields of the current transaction (empty outside one)."""
    ids = {"trace.id": elasticapm.get_trace_id(), "transaction.id": elasticapm.get_transaction_id()}
    return {k: v for k, v in ids.items() if v}
