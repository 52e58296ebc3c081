#!/usr/bin/env python3
"""An agent that answers requests: it receives from `agents/researcher` as the competing consumer
`researchers` (every instance shares the work), answers each request into its reply mailbox with
the same correlation id, and acknowledges it only once the answer is published, so a request
whose responder dies mid-way is delivered again to another instance.

    colony agent run --name researcher --replicas 2 --env COLONY_PROTO=... -- python3 responder.py
"""

import json
import os

from colony_local import local_admin, log

TOPIC = "agents/researcher"
CONSUMER = "researchers"


def answer(question):
    q = question.get("q", "")
    return {
        "q": q,
        "answer": f"{len(q.split())} words about {q!r}",
        "by": "researcher-" + os.environ.get("COLONY_AGENT_INSTANCE", "?"),
    }


def main():
    pb, admin = local_admin()
    log(f"researcher {os.environ.get('COLONY_AGENT_INSTANCE')} serving {TOPIC}")
    while True:
        received = admin.Receive(
            pb.ReceiveRequest(topic=TOPIC, consumer=CONSUMER, max=8, wait_ms=10_000),
            timeout=30,
        )
        for d in received.deliveries:
            m = d.message
            try:
                reply = json.dumps(answer(json.loads(m.payload))).encode()
            except ValueError:
                reply = json.dumps({"error": "the request is not JSON"}).encode()
            if m.reply_to:
                admin.Publish(
                    pb.PublishRequest(
                        topic=m.reply_to, payload=reply, correlation_id=m.correlation_id
                    ),
                    timeout=10,
                )
            admin.Ack(
                pb.AckRequest(
                    topic=TOPIC,
                    consumer=CONSUMER,
                    deliveries=[pb.DeliveryRef(seq=m.seq, delivery=d.delivery)],
                ),
                timeout=10,
            )
            log(f"answered request {m.seq}")


if __name__ == "__main__":
    main()
