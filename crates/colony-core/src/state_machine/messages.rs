//! Messaging commands: publish, receive, ack, and topic creation and deletion, applied at the
//! proposal's time. The rules live in `crate::messaging`; this file only routes to them.

use super::{CommandError, Outcome, StateMachine};
use crate::messaging::{DeliveryRef, Messaging, PublishSpec, ReceiveSpec, TopicKey, TopicPolicy};

impl StateMachine {
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
