"""Biller Lambda: one SQS record (BatchSize 1) is one customer-hour billed, one APM transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import EventType
from aws_lambda_powertools.utilities.batch.decorators import async_process_partial_response
from elasticapm import capture_serverless

from billing import tracing
from billing.bootstrap import Runtime
from billing.collector import settle_after_init
from billing.config import load_settings
from billing.entrypoints.biller import bill_body
from billing.entrypoints.loop import LoopBatchProcessor

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
    from aws_lambda_powertools.utilities.typing import LambdaContext

logger = Logger()
runtime = Runtime(load_settings())  # configuration errors fail here, at cold start
# before capture_serverless, which uses the process's agent if there is one
tracing.lambda_agent(register_transactions=runtime.settings.apm_register_transactions)
# a failed record is always reported as a batchItemFailure, even when it is the whole batch (BatchSize 1)
processor = LoopBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


async def record_handler(record: SQSRecord) -> dict[str, Any]:
    sent = record.attributes.sent_timestamp
    outcome = await bill_body(runtime, record.body, record.message_id, int(sent) if sent else None)
    return {"customer_id": outcome.customer_id, "already_billed": outcome.already_billed}


# capture_serverless is a sync wrapper: the coroutine runs on the module's loop inside the transaction
@capture_serverless
@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return dict(async_process_partial_response(event, record_handler, processor, context))


# Module init is done (settings, clients, the agent and its instrumentation): those objects live as
# long as the execution environment, so the cyclic collector need not scan them at every full
# collection of a warm invocation; and its young collections run less often (billing.collector).
settle_after_init()
