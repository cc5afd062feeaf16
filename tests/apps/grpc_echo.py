"""A gRPC server and client built on Python's grpcio (C core), knowing
nothing of the mesh: the interception tests run them as unmodified apps.

  grpc_echo.py serve PORT NAME      answers trellis.Echo/Say with "NAME: <request>"
                                    and trellis.Echo/Fail with UNAVAILABLE
  grpc_echo.py call ADDR METHOD MSG prints the reply, or "status=<code name>"
"""
import sys
from concurrent import futures

import grpc

SERVICE = "trellis.Echo"


def serve(port, name):
    def say(request, context):
        return name.encode() + b": " + request

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"serving on {port}", flush=True)
    server.wait_for_termination()


def call(addr, method, message):
    with grpc.insecure_channel(addr) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            print(stub(message.encode(), timeout=10).decode())
        except grpc.RpcError as e:
            print(f"status={e.code().name}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        call(sys.argv[2], sys.argv[3], sys.argv[4])
