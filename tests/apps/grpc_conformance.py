"""A gRPC echo for the GRPCRoute tests, on Python's grpcio (C core).

  grpc_conformance.py serve ADDR POD
      answers every method with JSON {"pod", "method", "metadata"} (the
      request's metadata, each name's values in order); prints "port N"
      once listening (ADDR's port may be 0)
  grpc_conformance.py call PROXY AUTHORITY METHOD N [NAME=VALUE ...]
      makes N unary calls of METHOD (/package.Service/Method) to
      AUTHORITY through PROXY (a sidecar's outbound listener, spoken to
      in h2c as a gRPC client speaks to a server), with the metadata
      given; prints one JSON line per call: {"code", "reply"}
  grpc_conformance.py connect PROXY AUTHORITY METHOD N [NAME=VALUE ...]
      the same, with the sidecar as the client's HTTP proxy as users set
      it up (`http_proxy`), so grpc-core tunnels each connection through
      it with CONNECT AUTHORITY
"""
import json
import os
import sys
from concurrent import futures

import grpc


def serve(addr, pod):
    class Echo(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method

            def reply(request, context):
                metadata = {}
                for name, value in context.invocation_metadata():
                    metadata.setdefault(name, []).append(value)
                answer = {"pod": pod, "method": method, "metadata": metadata}
                return json.dumps(answer).encode()

            return grpc.unary_unary_rpc_method_handler(reply)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((Echo(),))
    port = server.add_insecure_port(addr)
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


def call(proxy, authority, method, n, pairs, tunnel=False):
    metadata = [tuple(p.split("=", 1)) for p in pairs]
    if tunnel:
        os.environ.pop("no_proxy", None)
        os.environ.pop("NO_PROXY", None)
        os.environ["http_proxy"] = f"http://{proxy}"
        channel = grpc.insecure_channel(authority)
    else:
        options = [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
        channel = grpc.insecure_channel(proxy, options=options)
    with channel:
        stub = channel.unary_unary(method)
        for _ in range(n):
            try:
                reply = json.loads(stub(b"hi", timeout=10, metadata=metadata))
                print(json.dumps({"code": "OK", "reply": reply}))
            except grpc.RpcError as e:
                print(json.dumps({"code": e.code().name, "reply": None}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        tunnel = sys.argv[1] == "connect"
        call(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:], tunnel)
