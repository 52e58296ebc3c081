//! Durable messages in the state machine: order by priority then publish order, ack deadlines and
//! redelivery, dead letters, broadcast and competing consumers, idempotent publishes, full topics,
//! bad input refused with nothing changed, age retention, and replicas that agree. Invariants are
//! checked after every command.

#![allow(clippy::unwrap_used)]

use colony_core::{
    Command, CommandError, DeliveryRef, MessageError, Outcome, Proposal, PublishSpec, ReceiveSpec,
    Received, Retention, StateMachine, TopicKey, TopicPolicy, WhenFull,
};

const T0: u64 = 1_700_000_000_000;

struct Cluster {
    machine: StateMachine,
    now: u64,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster { machine: StateMachine::new(), now: T0 }
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, CommandError> {
        let proposal = Proposal { now_unix_ms: self.now, commands: vec![command] };
        let result = self.machine.apply_proposal(&proposal).pop().unwrap();
        self.machine.check_invariants().unwrap();
        result
    }

    fn publish(&mut self, topic: &str, payload: &str, priority: u8) -> u64 {
        match self.apply(Command::Publish(publish(topic, payload, priority))).unwrap() {
            Outcome::Published(p) => p.seq,
            other => panic!("publish gave {other:?}"),
        }
    }

    fn receive(&mut self, topic: &str, consumer: &str, max: u32) -> Received {
        let spec = ReceiveSpec {
            topic: key(topic),
            consumer: consumer.to_owned(),
            max,
            ack_deadline_ms: Some(1_000),
        };
        match self.apply(Command::Receive(spec)).unwrap() {
            Outcome::Received(r) => r,
            other => panic!("receive gave {other:?}"),
        }
    }

    fn ack(&mut self, topic: &str, consumer: &str, seq: u64, delivery: u32) -> (Vec<u64>, usize) {
        let command = Command::Ack {
            topic: key(topic),
            consumer: consumer.to_owned(),
            deliveries: vec![DeliveryRef { seq, delivery }],
        };
        match self.apply(command).unwrap() {
            Outcome::Acked(a) => (a.acked, a.refused.len()),
            other => panic!("ack gave {other:?}"),
        }
    }
}

fn key(name: &str) -> TopicKey {
    TopicKey { namespace: "default".to_owned(), name: name.to_owned() }
}

fn publish(topic: &str, payload: &str, priority: u8) -> PublishSpec {
    PublishSpec {
        topic: key(topic),
        priority,
        payload: payload.as_bytes().to_vec(),
        idempotency_key: None,
        reply_to: None,
        correlation_id: None,
    }
}

fn payloads(received: &Received) -> Vec<String> {
    received
        .messages
        .iter()
        .map(|d| String::from_utf8(d.message.payload.clone()).unwrap())
        .collect()
}

#[test]
fn higher_priority_first_then_publish_order() {
    let mut c = Cluster::new();
    c.publish("topics/a", "low-1", 0);
    c.publish("topics/a", "high", 5);
    c.publish("topics/a", "low-2", 0);
    c.publish("topics/a", "top", 9);
    let got = c.receive("topics/a", "workers", 10);
    assert_eq!(payloads(&got), ["top", "high", "low-1", "low-2"]);
    assert!(got.messages.iter().all(|d| d.delivery == 1 && d.ack_deadline_unix_ms == T0 + 1_000));
}

#[test]
fn unacked_message_is_redelivered_after_its_deadline_and_never_after_an_ack() {
    let mut c = Cluster::new();
    let seq = c.publish("topics/a", "m", 0);
    assert_eq!(c.receive("topics/a", "w", 1).messages.len(), 1);
    // Before the deadline nothing is handed out again.
    c.now += 999;
    assert!(c.receive("topics/a", "w", 1).messages.is_empty());
    c.now += 1;
    let again = c.receive("topics/a", "w", 1);
    assert_eq!(again.messages.len(), 1);
    assert_eq!(again.messages[0].delivery, 2);
    // The first delivery's ack is refused: the message went out again.
    assert_eq!(c.ack("topics/a", "w", seq, 1), (vec![], 1));
    assert_eq!(c.ack("topics/a", "w", seq, 2), (vec![seq], 0));
    // Acknowledged: never delivered to this consumer again, and a second ack is refused.
    c.now += 10_000;
    assert!(c.receive("topics/a", "w", 1).messages.is_empty());
    assert_eq!(c.ack("topics/a", "w", seq, 2), (vec![], 1));
}

#[test]
fn late_ack_before_redelivery_is_accepted() {
    let mut c = Cluster::new();
    let seq = c.publish("topics/a", "m", 0);
    c.receive("topics/a", "w", 1);
    c.now += 5_000;
    assert_eq!(c.ack("topics/a", "w", seq, 1), (vec![seq], 0));
    assert!(c.receive("topics/a", "w", 1).messages.is_empty());
}

#[test]
fn a_message_never_acked_becomes_a_dead_letter_after_its_deliveries() {
    let mut c = Cluster::new();
    let policy = TopicPolicy { deliveries_max: 3, ..TopicPolicy::default() };
    c.apply(Command::CreateTopic { topic: key("topics/a"), policy, delete_after_unix_ms: None })
        .unwrap();
    let seq = c.publish("topics/a", "poison", 0);
    for delivery in 1..=3 {
        let got = c.receive("topics/a", "w", 1);
        assert_eq!(got.messages[0].delivery, delivery);
        c.now += 1_000;
    }
    let got = c.receive("topics/a", "w", 1);
    assert!(got.messages.is_empty());
    assert_eq!(got.dead_lettered, vec![seq]);
    let dead = c.receive("dead-letter/topics/a", "ops", 10);
    assert_eq!(payloads(&dead), ["poison"]);
    let origin = dead.messages[0].message.dead_letter.clone().unwrap();
    assert_eq!(
        (origin.topic.as_str(), origin.consumer.as_str(), origin.seq, origin.deliveries),
        ("topics/a", "w", seq, 3)
    );
    // Another consumer of the topic still gets it: dead letters are per consumer.
    assert_eq!(payloads(&c.receive("topics/a", "other", 1)), ["poison"]);
}

#[test]
fn distinct_consumers_each_get_every_message_and_one_name_shares() {
    let mut c = Cluster::new();
    for i in 0..4 {
        c.publish("topics/a", &format!("m{i}"), 0);
    }
    // Two callers with one name share: together they get each message once.
    let first = c.receive("topics/a", "summarizers", 2);
    let second = c.receive("topics/a", "summarizers", 2);
    assert_eq!(payloads(&first), ["m0", "m1"]);
    assert_eq!(payloads(&second), ["m2", "m3"]);
    assert!(c.receive("topics/a", "summarizers", 2).messages.is_empty());
    // Another name gets all of them (broadcast).
    assert_eq!(payloads(&c.receive("topics/a", "archivers", 10)), ["m0", "m1", "m2", "m3"]);
}

#[test]
fn idempotent_publish_is_stored_once_and_a_conflicting_one_is_refused() {
    let mut c = Cluster::new();
    let spec =
        PublishSpec { idempotency_key: Some("k1".to_owned()), ..publish("topics/a", "x", 0) };
    let Outcome::Published(first) = c.apply(Command::Publish(spec.clone())).unwrap() else {
        panic!()
    };
    let Outcome::Published(again) = c.apply(Command::Publish(spec.clone())).unwrap() else {
        panic!()
    };
    assert_eq!((again.seq, again.existing, first.existing), (first.seq, true, false));
    let other = PublishSpec { payload: b"y".to_vec(), ..spec };
    let before = c.machine.clone();
    assert!(matches!(
        c.apply(Command::Publish(other)),
        Err(CommandError::Message(MessageError::KeyConflict { .. }))
    ));
    assert_eq!(c.machine, before);
    assert_eq!(c.receive("topics/a", "w", 10).messages.len(), 1);
}

#[test]
fn a_full_topic_rejects_or_drops_its_oldest_as_its_policy_says() {
    let mut c = Cluster::new();
    let small = TopicPolicy { messages_max: 2, ..TopicPolicy::default() };
    c.apply(Command::CreateTopic {
        topic: key("topics/strict"),
        policy: small.clone(),
        delete_after_unix_ms: None,
    })
    .unwrap();
    c.publish("topics/strict", "1", 0);
    c.publish("topics/strict", "2", 0);
    let before = c.machine.clone();
    let refused = c.apply(Command::Publish(publish("topics/strict", "3", 0))).unwrap_err();
    assert!(refused.to_string().contains("is full"), "{refused}");
    assert_eq!(c.machine, before);

    let lossy = TopicPolicy { when_full: WhenFull::DropOldest, ..small };
    c.apply(Command::CreateTopic {
        topic: key("topics/lossy"),
        policy: lossy,
        delete_after_unix_ms: None,
    })
    .unwrap();
    for i in 1..=3 {
        c.publish("topics/lossy", &i.to_string(), 0);
    }
    assert_eq!(payloads(&c.receive("topics/lossy", "w", 10)), ["2", "3"]);
    assert_eq!(c.machine.messaging().topic(&key("topics/lossy")).unwrap().dropped, 1);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut c = Cluster::new();
    c.publish("topics/a", "m", 0);
    let before = c.machine.clone();
    let huge = "x".repeat((64 << 10) + 1);
    let bad = [
        Command::Publish(publish("topics/a", &huge, 0)),
        Command::Publish(publish("topics/a", "m", 10)),
        Command::Publish(publish("", "m", 0)),
        Command::Publish(publish("topics/a b", "m", 0)),
        Command::Publish(publish("topics//a", "m", 0)),
        Command::Receive(ReceiveSpec {
            topic: key("topics/a"),
            consumer: "w".to_owned(),
            max: 0,
            ack_deadline_ms: None,
        }),
        Command::Receive(ReceiveSpec {
            topic: key("topics/a"),
            consumer: "w".to_owned(),
            max: 1,
            ack_deadline_ms: Some(1),
        }),
        Command::Ack {
            topic: key("topics/a"),
            consumer: "nobody".to_owned(),
            deliveries: vec![DeliveryRef { seq: 1, delivery: 1 }],
        },
        Command::Ack {
            topic: key("topics/none"),
            consumer: "w".to_owned(),
            deliveries: vec![DeliveryRef { seq: 1, delivery: 1 }],
        },
        Command::Ack { topic: key("topics/a"), consumer: "w".to_owned(), deliveries: vec![] },
        Command::CreateTopic {
            topic: key("topics/b"),
            policy: TopicPolicy { messages_max: 0, ..TopicPolicy::default() },
            delete_after_unix_ms: None,
        },
        Command::DeleteTopic { topic: key("topics/none") },
    ];
    for command in bad {
        let error = c.apply(command.clone()).expect_err(&format!("{command:?} was accepted"));
        assert!(!error.to_string().is_empty());
        assert_eq!(c.machine, before, "{command:?} changed the state");
    }
    // An ack of a never-delivered message is refused within an accepted command.
    c.receive("topics/a", "w", 1);
    assert_eq!(c.ack("topics/a", "w", 99, 1), (vec![], 1));
}

#[test]
fn old_messages_and_past_due_mailboxes_are_collected() {
    let mut c = Cluster::new();
    let short = TopicPolicy { age_ms_max: 60_000, ..TopicPolicy::default() };
    c.apply(Command::CreateTopic {
        topic: key("topics/a"),
        policy: short,
        delete_after_unix_ms: None,
    })
    .unwrap();
    c.apply(Command::CreateTopic {
        topic: key("replies/r1"),
        policy: TopicPolicy::default(),
        delete_after_unix_ms: Some(T0 + 30_000),
    })
    .unwrap();
    c.publish("topics/a", "old", 0);
    c.now += 40_000;
    c.publish("topics/a", "new", 0);
    assert!(c.machine.collectable(&Retention::DEFAULT, c.now));
    let Outcome::Collected(collected) = c.apply(Command::Collect(Retention::DEFAULT)).unwrap()
    else {
        panic!()
    };
    assert_eq!((collected.messages, collected.topics), (0, 1));
    assert!(c.machine.messaging().topic(&key("replies/r1")).is_none());
    c.now += 20_001;
    let Outcome::Collected(collected) = c.apply(Command::Collect(Retention::DEFAULT)).unwrap()
    else {
        panic!()
    };
    assert_eq!(collected.messages, 1);
    assert_eq!(payloads(&c.receive("topics/a", "w", 10)), ["new"]);
    assert!(!c.machine.collectable(&Retention::DEFAULT, c.now));
}

#[test]
fn replicas_applying_the_same_log_agree() {
    let mut log = Vec::new();
    let mut now = T0;
    for i in 0..200u64 {
        now += 37;
        let command = match i % 5 {
            0 | 1 => Command::Publish(publish("topics/a", &format!("m{i}"), (i % 10) as u8)),
            2 => Command::Receive(ReceiveSpec {
                topic: key("topics/a"),
                consumer: format!("c{}", i % 3),
                max: 3,
                ack_deadline_ms: Some(200),
            }),
            3 => Command::Ack {
                topic: key("topics/a"),
                consumer: "c0".to_owned(),
                deliveries: vec![DeliveryRef { seq: i / 3, delivery: 1 }],
            },
            _ => Command::Receive(ReceiveSpec {
                topic: key("topics/a"),
                consumer: "c1".to_owned(),
                max: 2,
                ack_deadline_ms: None,
            }),
        };
        log.push(Proposal { now_unix_ms: now, commands: vec![command] });
    }
    let mut a = StateMachine::new();
    let mut b = StateMachine::new();
    for proposal in &log {
        let ra = a.apply_proposal(proposal);
        let rb = b.apply_proposal(proposal);
        assert_eq!(ra, rb);
        a.check_invariants().unwrap();
    }
    assert_eq!(a, b);
}

#[test]
fn a_restore_makes_every_delivery_due_again_and_refuses_acks_from_before_it() {
    let mut c = Cluster::new();
    let seq = c.publish("topics/a", "m", 0);
    c.receive("topics/a", "w", 1);
    let restored = c.machine.prepare_restore();
    c.machine.check_invariants().unwrap();
    assert_eq!(restored.deliveries_expired, 1);
    let again = c.receive("topics/a", "w", 1);
    assert_eq!(again.messages[0].delivery, 2);
    assert_eq!(c.ack("topics/a", "w", seq, 1), (vec![], 1));
    assert_eq!(c.ack("topics/a", "w", seq, 2), (vec![seq], 0));
}

#[test]
fn the_cluster_wide_byte_bound_refuses_a_publish_past_it() {
    let mut c = Cluster::new();
    let big = "x".repeat(60 << 10);
    // 1 GiB in 60 KiB messages spread over topics under their own 64 MiB bounds.
    let mut published = 0u64;
    let refused = loop {
        let topic = format!("topics/t{}", published / 1000);
        // Applied without the whole-state check after each (it is O(messages)); checked below.
        let proposal = Proposal {
            now_unix_ms: c.now,
            commands: vec![Command::Publish(publish(&topic, &big, 0))],
        };
        match c.machine.apply_proposal(&proposal).pop().unwrap() {
            Ok(_) => published += 1,
            Err(e) => break e,
        }
        assert!(published < 20_000, "never refused");
    };
    assert!(refused.to_string().contains("would pass its limit"), "{refused}");
    assert_eq!(published, (1u64 << 30) / (60 << 10));
    c.machine.check_invariants().unwrap();
    // Deleting a topic makes room.
    c.apply(Command::DeleteTopic { topic: key("topics/t0") }).unwrap();
    c.apply(Command::Publish(publish("topics/t0", &big, 0))).unwrap();
}
