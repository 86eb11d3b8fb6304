"""Usage from Elasticsearch: one search per customer-hour, aggregated per hour and metric."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Context, Decimal
from typing import TYPE_CHECKING, Any

from elastic_transport import ConnectionError as EsConnectionError
from elastic_transport import ConnectionTimeout
from elasticsearch import ApiError

from billing.domain.errors import ConfigurationError, TransientError
from billing.domain.model import UsageTotal

if TYPE_CHECKING:
    from elasticsearch import AsyncElasticsearch

    from billing.config import Settings

MAX_METRICS = 200
# Elasticsearch sums doubles (0.1 + 0.2 comes back as 0.30000000000000004). A double holds 15 significant
# decimal digits faithfully; rounding the sum to them removes the binary noise, so a decimal quantity
# summed in Elasticsearch equals the one Postgres's NUMERIC gives.
_DOUBLE_DIGITS = Context(prec=sys.float_info.dig)


class ElasticsearchUsageSource:
    """A single search with a date histogram and a terms aggregation: never one query per cluster."""

    def __init__(self, client: AsyncElasticsearch, settings: Settings) -> None:
        self._client = client
        self._index = settings.es_index
        self._ts = settings.es_field_timestamp
        self._customer = settings.es_field_customer
        self._metric = settings.es_field_metric
        self._quantity = settings.es_field_quantity

    def query(self, customer_id: str, start: datetime, end: datetime) -> dict[str, Any]:
        """The search body (public so tests and docs show exactly what is asked)."""
        return {
            "size": 0,
            "track_total_hits": False,
            "query": {
                "bool": {
                    "filter": [
                        {"term": {self._customer: customer_id}},
                        {"range": {self._ts: {"gte": start.isoformat(), "lt": end.isoformat()}}},
                    ]
                }
            },
            "aggs": {
                "hours": {
                    "date_histogram": {
                        "field": self._ts,
                        "fixed_interval": "1h",
                        "time_zone": "UTC",
                        "min_doc_count": 1,
                    },
                    "aggs": {
                        "metrics": {
                            "terms": {"field": self._metric, "size": MAX_METRICS},
                            "aggs": {"quantity": {"sum": {"field": self._quantity}}},
                        }
                    },
                }
            },
        }

    async def hourly_usage(self, customer_id: str, start: datetime, end: datetime) -> list[UsageTotal]:
        body = self.query(customer_id, start, end)
        try:
            # a failed shard must fail the search: partial results (the default) would under-bill silently
            response = await self._client.search(
                index=self._index, allow_partial_search_results=False, **body
            )
        except (EsConnectionError, ConnectionTimeout) as exc:
            raise TransientError(f"Elasticsearch unreachable: {type(exc).__name__}") from exc
        except ApiError as exc:
            if exc.status_code in (429, 502, 503, 504) or exc.status_code >= 500:
                raise TransientError(f"Elasticsearch answered {exc.status_code}") from exc
            raise ConfigurationError(
                f"Elasticsearch refused the usage search: {exc.status_code} {exc.message}"
            ) from exc
        if response.get("timed_out") or response.get("_shards", {}).get("failed", 0):
            raise TransientError("Elasticsearch answered with partial results (shard failures or a timeout)")
        totals = []
        for bucket in response["aggregations"]["hours"]["buckets"]:
            if bucket["metrics"].get("sum_other_doc_count", 0):
                raise ConfigurationError(f"more than {MAX_METRICS} usage metrics for one customer-hour")
            hour = datetime.fromtimestamp(bucket["key"] / 1000, tz=UTC)
            for term in bucket["metrics"]["buckets"]:
                totals.append(UsageTotal(hour, str(term["key"]), _decimal(term["quantity"]["value"])))
        return totals


def _decimal(value: float | None) -> Decimal:
    """A double sum as the decimal it stands for: its shortest text, rounded to 15 significant digits."""
    if value is None:
        return Decimal(0)
    rounded = _DOUBLE_DIGITS.create_decimal(repr(value))
    # 0.300000000000000 -> 0.3 and 3.0 -> 3, without normalize()'s exponent form for integers (3E+1)
    return Decimal(int(rounded)) if rounded == rounded.to_integral_value() else rounded.normalize()
