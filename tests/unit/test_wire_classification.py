"""Which failed BatchMeterUsage calls provably sent nothing: judged by the aiohttp error aiobotocore wraps.

The pairs below are aiobotocore 2.25's own mapping (aiobotocore/httpsession.py, ``send``): it raises the
botocore class on the left with the aiohttp error as ``error``. A reset while reading and a refused connect
share EndpointConnectionError; only the error underneath tells them apart.
"""

from __future__ import annotations

import errno
import socket

import aiohttp
import pytest
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from billing.adapters.aws_metering import never_sent

URL = "https://metering.marketplace.us-east-1.amazonaws.com/"
REFUSED = aiohttp.ClientConnectorError(None, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "sent_nothing"),
    [
        (EndpointConnectionError(endpoint_url=URL, error=REFUSED), True),
        (
            EndpointConnectionError(endpoint_url=URL, error=socket.gaierror(-2, "Name or service not known")),
            True,
        ),
        (
            ConnectTimeoutError(endpoint_url=URL, error=aiohttp.ConnectionTimeoutError("Connection timeout")),
            True,
        ),
        # a RST while the answer is read: aiohttp's ClientOSError(ECONNRESET), the same botocore class
        (
            EndpointConnectionError(endpoint_url=URL, error=aiohttp.ClientOSError(errno.ECONNRESET, "reset")),
            False,
        ),
        (ConnectionClosedError(endpoint_url=URL, error=aiohttp.ServerDisconnectedError()), False),
        (ReadTimeoutError(endpoint_url=URL, error=aiohttp.SocketTimeoutError("Timeout on reading")), False),
        # without the aiohttp error nothing is proven
        (EndpointConnectionError(endpoint_url=URL), False),
        (ConnectionResetError(errno.ECONNRESET, "reset"), False),
    ],
    ids=["refused", "dns", "connect-timeout", "reset", "closed", "read-timeout", "no-cause", "bare-oserror"],
)
def test_only_an_error_raised_before_the_request_was_written_counts_as_not_sent(
    error: BaseException, sent_nothing: bool
) -> None:
    assert never_sent(error) is sent_nothing
