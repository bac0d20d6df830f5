"""The request path: what happens to a routed request (POST /v1/chat/completions, /v1/completions),
in the order it happens.

- handle.py: authenticate, read and check the body, route (routing.py), let the scaler prune the
  chain (scaling/), retrieve context (rag/), then forward; errors answered in OpenAI's shape;
- chain.py: the decision's chain of backends, tried in order;
- attempt.py: one backend, with its retries before the first byte;
- failures.py: what each transport exception means (circuit, retry, next backend, or which error);
- responses.py: the answer relayed to the client, buffered or streamed; backend_errors.py: a
  backend's error answer in OpenAI's shape.

docs/architecture.md walks a request through these and the modules around them.
"""

from .handle import MAX_BODY_BYTES, RequestPath, read_body
from .responses import CLIENT_GONE, BufferedResponse, RelayedStream

__all__ = ["CLIENT_GONE", "MAX_BODY_BYTES", "BufferedResponse", "RelayedStream", "RequestPath", "read_body"]
