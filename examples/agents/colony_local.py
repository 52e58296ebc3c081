"""What the example agents share: the admin API's stubs, compiled from admin.proto at start (into
the attempt's own working directory), and a channel to the attempt's local endpoint.

Inside a Colony task or agent, `$COLONY_AGENT_SOCKET` is a Unix socket that speaks the admin
API's messaging and discovery calls as this attempt: no token, no certificate, and only while
the attempt is current. `$COLONY_PROTO` names admin.proto (`colony dev` sets it); without it,
the proto/ directory of the checkout this file is in.
"""

import os
import sys

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))


def stubs():
    proto = os.environ.get("COLONY_PROTO") or os.path.join(
        HERE, "..", "..", "proto", "colony", "v1", "admin.proto"
    )
    # protoc wants the file under an include root that mirrors its package path.
    root = os.path.join(os.environ.get("HOME", "."), "colony-stubs")
    source = os.path.join(root, "src", "colony", "v1")
    os.makedirs(source, exist_ok=True)
    with open(proto, "rb") as f, open(os.path.join(source, "admin.proto"), "wb") as g:
        g.write(f.read())
    out = os.path.join(root, "out")
    os.makedirs(out, exist_ok=True)
    status = protoc.main(
        [
            "protoc",
            f"-I{os.path.join(root, 'src')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(source, "admin.proto"),
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed with status {status}")
    sys.path.insert(0, out)
    from colony.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402

    return admin_pb2, admin_pb2_grpc


def local_admin():
    """(messages, stub) for this attempt's local endpoint."""
    socket = os.environ.get("COLONY_AGENT_SOCKET")
    if not socket:
        sys.exit("COLONY_AGENT_SOCKET is not set: run this as a Colony task or agent")
    pb, rpc = stubs()
    # The default authority would be the socket's path, which is no HTTP/2 authority.
    channel = grpc.insecure_channel(
        f"unix://{socket}", options=[("grpc.default_authority", "localhost")]
    )
    return pb, rpc.AdminStub(channel)


def log(*parts):
    print(*parts, flush=True)
