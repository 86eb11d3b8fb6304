"""Subscriptions Lambda: AWS agreement events (EventBridge), the legacy SaaS SNS topic (through SQS),
and the marketplaces' HTTP calls (API Gateway HTTP API): each recorded in the subject's history."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger
from elasticapm import capture_serverless

from billing import tracing
from billing.bootstrap import Runtime
from billing.collector import settle_after_init
from billing.config import load_settings
from billing.entrypoints.loop import LOOP
from billing.entrypoints.subscriptions import Subscriptions, handle

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger()
runtime = Runtime(load_settings())  # configuration errors fail here, at cold start
subscriptions = Subscriptions(runtime)
tracing.lambda_agent(register_transactions=runtime.settings.apm_register_transactions)


@capture_serverless
@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return LOOP.run_until_complete(handle(subscriptions, event))


# Module init is done (settings, clients, the agent and its instrumentation): those objects live as
# long as the execution environment, so the cyclic collector need not scan them at every full
# collection of a warm invocation; and its young collections run less often (billing.collector).
settle_after_init()
