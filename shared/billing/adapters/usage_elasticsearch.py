"""Usage from Elasticsearch: one search per customer-hour, aggregated per hour and metric."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
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
            response = await self._client.search(index=self._index, **body)
        except (EsConnectionError, ConnectionTimeout) as exc:
            raise TransientError(f"Elasticsearch unreachable: {type(exc).__name__}") from exc
        except ApiError as exc:
            if exc.status_code in (429, 502, 503, 504) or exc.status_code >= 500:
                raise TransientError(f"Elasticsearch answered {exc.status_code}") from exc
            raise ConfigurationError(f"Elasticsearch refused the usage search: {exc.status_code} {exc.message}") from exc
        totals = []
        for bucket in response["aggregations"]["hours"]["buckets"]:
            if bucket["metrics"].get("sum_other_doc_count", 0):
                raise ConfigurationError(f"more than {MAX_METRICS} usage metrics for one customer-hour")
            hour = datetime.fromtimestamp(bucket["key"] / 1000, tz=UTC)
            for term in bucket["metrics"]["buckets"]:
                value = term["quantity"]["value"]
                # sums come back as JSON numbers: read their decimal text, not a binary float's expansion
                totals.append(UsageTotal(hour, str(term["key"]), Decimal(repr(value)) if value else Decimal(0)))
        return totals
