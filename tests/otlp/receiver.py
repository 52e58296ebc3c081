#!/usr/bin/env python3
"""A real OTLP/gRPC trace receiver for the tracing test, built on the official
`opentelemetry-proto` package (the OpenTelemetry Collector is not installable here).

    receiver.py --listen 127.0.0.1:0 --out spans.jsonl

Serves `opentelemetry.proto.collector.trace.v1.TraceService/Export`, writes every span it
receives as one JSON line to --out (flushed per request), and prints `listening on HOST:PORT`
once it serves. Runs until killed.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def attribute_value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            resource = {a.key: attribute_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(json.dumps({
                        "service": resource.get("service.name"),
                        "instance": resource.get("service.instance.id"),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start_unix_nano": span.start_time_unix_nano,
                        "end_unix_nano": span.end_time_unix_nano,
                        "status_code": span.status.code,
                        "attributes": {a.key: attribute_value(a.value) for a in span.attributes},
                    }))
        with self.lock:
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = open(args.out, "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        print(f"error: cannot listen on {args.listen}", file=sys.stderr)
        sys.exit(1)
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
