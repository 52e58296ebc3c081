#!/usr/bin/env python3
"""Colony's admin API from Python with grpcio: all a client needs is proto/, the cluster CA's
certificate and a token.

    pip install grpcio grpcio-tools
    colony cluster ca > ca.pem                      # or DATA_DIR/tls/ca.pem of a server
    python3 examples/python/colony_admin.py --endpoint 127.0.0.1:7101 --ca ca.pem --token "$COLONY_TOKEN"

It compiles proto/colony/v1/admin.proto into a temporary directory, then calls ClusterStatus,
submits a task (with a secret in its environment) and reads it back, and shows that a call
without the token is refused with UNAUTHENTICATED. Prints one JSON object.
"""

import argparse
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_stubs(out_dir):
    proto_dir = os.path.join(REPO, "proto")
    status = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(proto_dir, "colony", "v1", "admin.proto"),
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed with status {status}")
    sys.path.insert(0, out_dir)
    from colony.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402

    return admin_pb2, admin_pb2_grpc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="127.0.0.1:7101")
    parser.add_argument("--ca", required=True, help="the cluster CA certificate (PEM)")
    parser.add_argument("--token", default=os.environ.get("COLONY_TOKEN"))
    args = parser.parse_args()
    if not args.token:
        sys.exit("pass --token or set COLONY_TOKEN")

    with tempfile.TemporaryDirectory() as out_dir:
        pb, rpc = load_stubs(out_dir)
        with open(args.ca, "rb") as f:
            tls = grpc.ssl_channel_credentials(root_certificates=f.read())
        # Sends `authorization: Bearer <token>` on every call.
        bearer = grpc.access_token_call_credentials(args.token)
        channel = grpc.secure_channel(args.endpoint, grpc.composite_channel_credentials(tls, bearer))
        admin = rpc.AdminStub(channel)

        status = admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        spec = pb.TaskSpec(
            name="from-python",
            # No namespace: the task goes to "default".
            builtin=pb.BuiltinRun(handler="echo", input="hello from python"),
            resources=pb.Resources(cpu_millis=100, memory_bytes=16 << 20),
        )
        submitted = admin.SubmitTask(pb.SubmitTaskRequest(spec=spec), timeout=10).task
        read = admin.GetTask(pb.GetTaskRequest(id=submitted.id), timeout=10).task

        anonymous = rpc.AdminStub(grpc.secure_channel(args.endpoint, tls))
        try:
            anonymous.ListTasks(pb.ListTasksRequest(), timeout=10)
            refused = "OK"
        except grpc.RpcError as error:
            refused = error.code().name

        print(
            json.dumps(
                {
                    "cluster_id": status.cluster_id,
                    "leader_id": status.leader_id,
                    "submitted": submitted.id,
                    "namespace": read.spec.namespace,
                    "state": pb.TaskState.Name(read.state),
                    "anonymous": refused,
                }
            )
        )


if __name__ == "__main__":
    main()
