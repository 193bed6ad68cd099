"""keygate's refusals of gRPC calls, read by a real gRPC client (grpcio, the reference Python
implementation): a call without a token is UNAUTHENTICATED, one with a token lacking the route's
scope PERMISSION_DENIED, one to no route UNIMPLEMENTED, each with the stable code in its details.

Environment (set by scripts/interop-test):
  KEYGATE_ADMIN_URL    the admin listener
  KEYGATE_GATEWAY_URL  the gateway, http:// (gRPC over h2c, prior knowledge)
  KEYGATE_ROOT_KEY     a root key with tokens:write
  INTEROP_RESULTS      a file to append "grpc-refusals <passed> <failed>" to

The route /grpc.health.v1.Health needs the scope health:read (scripts/interop-test's config).
"""

import os
import urllib.parse

import grpc

from checks import Checks, create_token

ADMIN = os.environ["KEYGATE_ADMIN_URL"]
GATEWAY = urllib.parse.urlparse(os.environ["KEYGATE_GATEWAY_URL"]).netloc
KEY = os.environ["KEYGATE_ROOT_KEY"]
checks = Checks("grpc-refusals")
check = checks.check


def token(scopes):
    return create_token(ADMIN, KEY, {"name": "grpc", "scopes": scopes})["token"]


def call(method, bearer=None):
    """A unary call with an empty message; returns (status code, details)."""
    with grpc.insecure_channel(GATEWAY) as channel:
        rpc = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        metadata = [("authorization", "Bearer " + bearer)] if bearer else None
        try:
            rpc(b"", metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""


code, details = call("/grpc.health.v1.Health/Check")
check("no token: UNAUTHENTICATED, missing_token", code == grpc.StatusCode.UNAUTHENTICATED
      and details.startswith("missing_token: "), (code, details))
code, details = call("/grpc.health.v1.Health/Check", "kg_not_a_token")
check("a malformed token: UNAUTHENTICATED, malformed_token", code == grpc.StatusCode.UNAUTHENTICATED
      and details.startswith("malformed_token: "), (code, details))
code, details = call("/grpc.health.v1.Health/Check", token(["orders:read"]))
check("a token without health:read: PERMISSION_DENIED, insufficient_scope",
      code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("insufficient_scope: "), (code, details))
code, details = call("/no.Such/Service", token([]))
check("no route: UNIMPLEMENTED, route_not_found", code == grpc.StatusCode.UNIMPLEMENTED
      and details.startswith("route_not_found: "), (code, details))

checks.finish()
