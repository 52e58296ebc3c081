#!/usr/bin/env python3
"""An agent that asks: it finds the researchers in the registry (ResolveAgent), sends each
question as a request to `agents/researcher` and waits for the answer, and publishes every
answer to `topics/answers` for anyone to read (`colony msg subscribe topics/answers`).

    colony agent run --name requester --env COLONY_PROTO=... -- python3 requester.py
"""

import json
import os
import time

import grpc

from colony_local import local_admin, log

QUESTIONS = ["raft log compaction", "vector clocks", "consistent hashing", "gossip failure detectors"]


def main():
    pb, admin = local_admin()
    count = int(os.environ.get("QUESTIONS", "0")) or None
    asked = 0
    while count is None or asked < count:
        question = QUESTIONS[asked % len(QUESTIONS)]
        found = admin.ResolveAgent(pb.ResolveAgentRequest(name="researcher"), timeout=10)
        try:
            response = admin.Request(
                pb.RequestRequest(
                    topic="agents/researcher",
                    payload=json.dumps({"q": question}).encode(),
                    timeout_ms=20_000,
                ),
                timeout=30,
            )
        except grpc.RpcError as error:
            log(f"no answer to {question!r}: {error.code().name} {error.details()}")
            time.sleep(1)
            continue
        result = json.loads(response.reply.payload)
        result["researchers_registered"] = len(found.endpoints)
        admin.Publish(
            pb.PublishRequest(topic="topics/answers", payload=json.dumps(result).encode()),
            timeout=10,
        )
        log(f"asked {question!r}: {result['answer']} (from {result['by']})")
        asked += 1
        time.sleep(float(os.environ.get("PAUSE_S", "2")))


if __name__ == "__main__":
    main()
