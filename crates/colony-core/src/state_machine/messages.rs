//! Messaging commands: publish, receive, ack, and topic creation and deletion, applied at the
//! proposal's time, and the same made by a task's attempt (`as_attempt`, fenced by its token).
//! The rules live in `crate::messaging`; this file only routes to them.

use super::{holds_resources, Command, CommandError, Outcome, StateMachine};
use crate::ids::{FencingToken, TaskId};
use crate::messaging::{DeliveryRef, Messaging, PublishSpec, ReceiveSpec, TopicKey, TopicPolicy};

impl StateMachine {
    /// A messaging command of a task's current attempt, within the task's namespace.
    pub(super) fn as_attempt(
        &mut self,
        task: TaskId,
        token: FencingToken,
        command: &Command,
    ) -> Result<Outcome, CommandError> {
        let t = self.task(task)?;
        if t.fencing_token != Some(token) || !holds_resources(t.state) {
            return Err(CommandError::StaleAttempt { task, token });
        }
        let namespace = t.spec.namespace.clone();
        let topic = match command {
            Command::Publish(spec) => &spec.topic,
            Command::Receive(spec) => &spec.topic,
            Command::Ack { topic, .. } => topic,
            _ => return Err(CommandError::NotForAttempts("only publish, receive and ack".into())),
        };
        if topic.namespace != namespace {
            return Err(CommandError::NotForAttempts(format!(
                "use only its task's namespace {namespace:?}, not {:?}",
                topic.namespace
            )));
        }
        self.apply(command)
    }

    pub(super) fn publish(&mut self, spec: &PublishSpec) -> Result<Outcome, CommandError> {
        Ok(Outcome::Published(self.messaging.publish(spec, self.now_unix_ms)?))
    }

    pub(super) fn receive(&mut self, spec: &ReceiveSpec) -> Result<Outcome, CommandError> {
        Ok(Outcome::Received(self.messaging.receive(spec, self.now_unix_ms)?))
    }

    pub(super) fn ack(
        &mut self,
        topic: &TopicKey,
        consumer: &str,
        deliveries: &[DeliveryRef],
    ) -> Result<Outcome, CommandError> {
        Ok(Outcome::Acked(self.messaging.ack(topic, consumer, deliveries)?))
    }

    pub(super) fn create_topic(
        &mut self,
        topic: &TopicKey,
        policy: &TopicPolicy,
        delete_after_unix_ms: Option<u64>,
    ) -> Result<Outcome, CommandError> {
        let created =
            self.messaging.create_topic(topic, policy, delete_after_unix_ms, self.now_unix_ms)?;
        Ok(Outcome::TopicCreated { created })
    }

    pub(super) fn delete_topic(&mut self, topic: &TopicKey) -> Result<Outcome, CommandError> {
        let deleted = self.messaging.delete_topic(topic)?;
        Ok(Outcome::TopicDeleted { messages: deleted.messages.len() as u64 })
    }

    /// Topics, mailboxes and their messages.
    pub fn messaging(&self) -> &Messaging {
        &self.messaging
    }
}
