"""Which S3 errors pass by themselves (worth waiting out) and which say something about the queue."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq

URL = "http://127.0.0.1:9/bucket/key"


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(
    "error, passes",
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("RequestTimeout", 400), True),  # S3 gave up waiting for the body: send it again
        (EndpointConnectionError(endpoint_url=URL), True),
        (ConnectionClosedError(endpoint_url=URL), True),
        (ReadTimeoutError(endpoint_url=URL), True),
        # Answers about the queue itself: acting on them is the protocol's business, waiting changes nothing.
        (_client_error("PreconditionFailed", 412), False),
        (_client_error("ConditionalRequestConflict", 409), False),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (ValueError("not S3 at all"), False),
        (None, False),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, ClientError) else value.response["Error"]["Code"],
)
def test_transient(error, passes):
    assert tq.transient(error) is passes
