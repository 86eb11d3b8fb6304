"""The error taxonomy, in one place.

Transient errors are retried inside the invocation a bounded number of times and then fail the
SQS item so the queue redelivers it. Permanent errors are recorded in the ledger with their reason
and never retried. Configuration errors fail loudly at cold start. Bad messages fail their item
(and so end in the dead-letter queue) without touching the rest of the batch.
"""

from __future__ import annotations


class BillingError(Exception):
    """Base of every error the billing code raises on purpose."""


class TransientError(BillingError):
    """Worth retrying: throttling, HTTP 429/5xx, timeouts, dropped connections, database down."""


class PermanentError(BillingError):
    """Retrying cannot help: record the reason and stop."""


class ConfigurationError(BillingError):
    """The deployment is wrong; raised at cold start."""


class BadMessageError(PermanentError):
    """A message that is malformed, of an unknown version or names an unknown customer."""


class ClaimHeldError(TransientError):
    """Another delivery of the same customer-hour is submitting right now; retry later."""


class ConcurrentDecisionError(TransientError):
    """The customer's balances moved while this invocation decided; decide again."""


class MarketplaceUnavailableError(TransientError):
    """The marketplace still refused or timed out after the adapter's own retries; SQS redelivers."""


class ThrottledError(MarketplaceUnavailableError):
    """Every unsettled record was answered with a throttle, up to the bill's budget: nothing failed but the
    marketplace's quota, so the message goes back to its lane (SQS), not towards the dead-letter queue."""

    def __init__(self, message: str, marketplace: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.marketplace = marketplace
        self.retry_after = retry_after


class BudgetSpentError(TransientError):
    """The invocation's time budget ran out before the bill settled; SQS redelivers the message."""


class WindowExpiredError(PermanentError):
    """The marketplace no longer accepts records for this hour."""
