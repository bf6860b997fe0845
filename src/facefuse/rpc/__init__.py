"""The gRPC transport, owned in one place: the bottom layer every server, the gateway and the client use.

``status``: facefuse errors <-> gRPC status codes, both directions. ``deadline``: one deadline type
from a call's context to its downstream calls. ``options``: channel and server options.
``interceptors``: one server interceptor, so unary and streaming RPCs map errors, log and carry
request ids the same way. ``logs``: structured JSON logs with the request id. ``metrics``: Prometheus
metrics per server. Nothing here imports another facefuse package except ``facefuse.errors``.
"""
