"""Dispatcher Lambda: the scheduled rule (or an operator's backfill) dispatches one hour."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import elasticapm
from aws_lambda_powertools import Logger
from elasticapm import capture_serverless

from billing import tracing
from billing.bootstrap import Runtime
from billing.collector import settle_after_init
from billing.config import load_settings
from billing.entrypoints.loop import LOOP

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger()
runtime = Runtime(load_settings())  # configuration errors fail here, at cold start
# before capture_serverless, which uses the process's agent if there is one
tracing.lambda_agent(register_transactions=runtime.settings.apm_register_transactions)


@capture_serverless
@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    result = LOOP.run_until_complete(runtime.dispatch(event))
    elasticapm.label(billing_hour=result.period.isoformat(), run_id=str(result.run_id))
    elasticapm.set_transaction_outcome("success", override=False)
    elasticapm.set_transaction_result("dispatched", override=False)
    logger.info("dispatched", extra=result.as_dict())
    return result.as_dict()


# Module init is done (settings, clients, the agent and its instrumentation): those objects live as
# long as the execution environment, so the cyclic collector need not scan them at every full
# collection of a warm invocation; and its young collections run less often (billing.collector).
settle_after_init()
