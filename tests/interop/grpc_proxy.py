"""gRPC through keygate, end to end, with grpcio (the reference Python implementation) on both
sides: a gRPC server with the standard health service (grpcio-health-checking) and an echo
service behind a route with `upstream_protocol = "http2"` (h2c), called by grpcio's client through
keygate's gateway with a keygate token.

Checks: unary calls (Health/Check), a status the upstream sets (NOT_FOUND) reaching the client
through the trailers, server streaming (Health/Watch sees a change made while it streams), a
bidirectional stream in lock step (each reply read before the next message is sent: both
directions flow at once), what the upstream receives (keygate's identity fields, never the
credential), and keygate's own refusal on the same route (no token: UNAUTHENTICATED).

Environment (set by scripts/interop-test):
  KEYGATE_ADMIN_URL    the admin listener
  KEYGATE_GATEWAY_URL  the gateway, http:// (gRPC over h2c, prior knowledge)
  KEYGATE_ROOT_KEY     a root key with tokens:write
  GRPC_UPSTREAM_PORT   the port this script's gRPC server listens on (keygate's routes
                       /grpc.health.v1.Health and /keygate.test.Echo point there)
  INTEROP_RESULTS      a file to append "grpc-proxy <passed> <failed>" to
"""

import os
import queue
import urllib.parse
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from checks import Checks, create_token

ADMIN = os.environ["KEYGATE_ADMIN_URL"]
GATEWAY = urllib.parse.urlparse(os.environ["KEYGATE_GATEWAY_URL"]).netloc
KEY = os.environ["KEYGATE_ROOT_KEY"]
PORT = int(os.environ["GRPC_UPSTREAM_PORT"])
checks = Checks("grpc-proxy")
check = checks.check

# What the echo service saw of each call's metadata.
seen = queue.Queue()


def chat(requests, context):
    """Bidirectional: every message comes back at once, upper-cased."""
    seen.put(dict(context.invocation_metadata()))
    for message in requests:
        yield message.upper()


echo = grpc.method_handlers_generic_handler("keygate.test.Echo", {
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
})

server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
health_servicer = health.HealthServicer()
health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
health_servicer.set("orders", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
server.add_generic_rpc_handlers((echo,))
server.add_insecure_port(f"127.0.0.1:{PORT}")
server.start()

token = create_token(ADMIN, KEY, {"name": "grpc-proxy", "scopes": ["health:read", "echo:call"]})["token"]
auth = [("authorization", "Bearer " + token)]

try:
    with grpc.insecure_channel(GATEWAY) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        # Unary.
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), metadata=auth, timeout=10)
        check("unary Health/Check through keygate: SERVING",
              reply.status == health_pb2.HealthCheckResponse.SERVING, reply)

        # A status set by the upstream comes back in its trailers.
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), metadata=auth, timeout=10)
            check("an unknown service: NOT_FOUND from the upstream", False, "the call succeeded")
        except grpc.RpcError as e:
            check("an unknown service: NOT_FOUND from the upstream (grpc-status in the trailers)",
                  e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details()))

        # Server streaming: the first status, then a change made while the stream is open.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="orders"), metadata=auth, timeout=20)
        first = next(watch)
        check("Health/Watch streams the current status", first.status == health_pb2.HealthCheckResponse.SERVING,
              first)
        health_servicer.set("orders", health_pb2.HealthCheckResponse.NOT_SERVING)
        second = next(watch)
        check("Health/Watch streams a change made while it is open",
              second.status == health_pb2.HealthCheckResponse.NOT_SERVING, second)
        watch.cancel()

        # Bidirectional, in lock step: the next message is sent only after the reply to the
        # previous one came back through keygate.
        outgoing = queue.Queue()

        def messages():
            while True:
                m = outgoing.get()
                if m is None:
                    return
                yield m

        call = channel.stream_stream("/keygate.test.Echo/Chat", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
        replies = call(messages(), metadata=auth, timeout=20)
        lock_step = True
        for word in [b"one", b"two", b"three"]:
            outgoing.put(word)
            got = next(replies)
            lock_step &= got == word.upper()
        outgoing.put(None)
        rest = list(replies)
        check("a bidirectional stream in lock step (each reply before the next message)",
              lock_step and rest == [], rest)
        metadata = seen.get(timeout=5)
        check("the upstream sees keygate's identity fields, not the credential",
              metadata.get("x-keygate-token-id", "").startswith("tok_") and "authorization" not in metadata,
              sorted(metadata))

        # keygate's own refusal on the same route.
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            check("no token: refused by keygate", False, "the call succeeded")
        except grpc.RpcError as e:
            check("no token: UNAUTHENTICATED from keygate (missing_token)",
                  e.code() == grpc.StatusCode.UNAUTHENTICATED and (e.details() or "").startswith("missing_token"),
                  (e.code(), e.details()))
except Exception as e:  # a failure to reach keygate at all is one failed check, not a crash
    check("gRPC through keygate", False, repr(e))
finally:
    server.stop(grace=None)

checks.finish()
