//! What each request names, for its audit line: the namespace and the object it is about.

use colony_proto::pb;

/// The namespace and target a request names (either may be absent).
pub trait Target {
    fn namespace(&self) -> Option<String> {
        None
    }

    fn target(&self) -> Option<String> {
        None
    }
}

macro_rules! untargeted {
    ($($request:ty),* $(,)?) => { $(impl Target for $request {})* };
}

untargeted!(
    pb::ClusterStatusRequest,
    pb::StateDigestRequest,
    pb::ClusterInfoRequest,
    pb::ListExecutorsRequest,
    pb::ListModelsRequest,
    pb::BootstrapAclRequest,
    pb::ListAclTokensRequest,
    pb::ClusterCaRequest,
    pb::SaveSnapshotRequest,
);

impl Target for pb::SubmitTaskRequest {
    fn namespace(&self) -> Option<String> {
        let namespace = self.spec.as_ref().map(|s| s.namespace.clone()).unwrap_or_default();
        Some(match namespace.is_empty() {
            true => colony_core::DEFAULT_NAMESPACE.to_owned(),
            false => namespace,
        })
    }

    fn target(&self) -> Option<String> {
        self.spec.as_ref().map(|s| format!("task name {:?}", s.name))
    }
}

impl Target for pb::GetTaskRequest {
    fn target(&self) -> Option<String> {
        Some(format!("task {}", self.id))
    }
}

impl Target for pb::CancelTaskRequest {
    fn target(&self) -> Option<String> {
        Some(format!("task {}", self.id))
    }
}

impl Target for pb::ListTasksRequest {
    fn target(&self) -> Option<String> {
        Some(format!("tasks after {}", self.after_id))
    }
}

impl Target for pb::JoinClusterRequest {
    fn target(&self) -> Option<String> {
        Some(format!("server {} at {}", self.node_id, self.addr))
    }
}

impl Target for pb::RemoveNodeRequest {
    fn target(&self) -> Option<String> {
        Some(format!("server {}", self.node_id))
    }
}

impl Target for pb::CreateJoinTokenRequest {
    fn target(&self) -> Option<String> {
        Some(format!("join token kind {:?}", self.kind))
    }
}

impl Target for pb::DrainExecutorRequest {
    fn target(&self) -> Option<String> {
        Some(format!("executor {}", self.id))
    }
}

impl Target for pb::UndrainExecutorRequest {
    fn target(&self) -> Option<String> {
        Some(format!("executor {}", self.id))
    }
}

impl Target for pb::WatchFinishedTasksRequest {
    fn target(&self) -> Option<String> {
        Some(format!("finished after {}", self.after_seq))
    }
}

impl Target for pb::PublishModelRequest {
    fn target(&self) -> Option<String> {
        self.model.as_ref().map(|m| format!("model from {:?}", m.device))
    }
}

impl Target for pb::GetModelRequest {
    fn target(&self) -> Option<String> {
        Some(format!("model {}", self.version))
    }
}

impl Target for pb::RollbackModelRequest {
    fn target(&self) -> Option<String> {
        Some(format!("model {}", self.version))
    }
}

impl Target for pb::CreateAclTokenRequest {
    fn target(&self) -> Option<String> {
        Some(format!("token role {:?} namespaces {:?}", self.role, self.namespaces))
    }
}

impl Target for pb::RevokeAclTokenRequest {
    fn target(&self) -> Option<String> {
        Some(format!("token {}", self.accessor))
    }
}

impl Target for pb::EnrollRequest {
    fn target(&self) -> Option<String> {
        Some(match self.node_id {
            0 => "learner".to_owned(),
            id => format!("server {id} at {}", self.addr),
        })
    }
}

impl Target for pb::SubmitWorkflowRequest {
    fn namespace(&self) -> Option<String> {
        let namespace = self.spec.as_ref().map(|s| s.namespace.clone()).unwrap_or_default();
        Some(match namespace.is_empty() {
            true => colony_core::DEFAULT_NAMESPACE.to_owned(),
            false => namespace,
        })
    }

    fn target(&self) -> Option<String> {
        self.spec.as_ref().map(|s| format!("workflow name {:?}", s.name))
    }
}

impl Target for pb::GetWorkflowRequest {
    fn target(&self) -> Option<String> {
        Some(format!("workflow {}", self.id))
    }
}

impl Target for pb::ListWorkflowsRequest {
    fn target(&self) -> Option<String> {
        Some(format!("workflows after {}", self.after_id))
    }
}

impl Target for pb::CancelWorkflowRequest {
    fn target(&self) -> Option<String> {
        Some(format!("workflow {}", self.id))
    }
}

impl Target for pb::RetryWorkflowRequest {
    fn target(&self) -> Option<String> {
        Some(format!("workflow {}", self.id))
    }
}

impl Target for pb::GetTaskOutputRequest {
    fn target(&self) -> Option<String> {
        Some(format!("task {} output {:?}", self.id, self.name))
    }
}

macro_rules! topic_targeted {
    ($($request:ty),* $(,)?) => {$(
        impl Target for $request {
            fn namespace(&self) -> Option<String> {
                Some(colony_proto::messaging::namespace_or_default(&self.namespace))
            }

            fn target(&self) -> Option<String> {
                Some(format!("topic {:?}", self.topic))
            }
        }
    )*};
}

topic_targeted!(
    pb::PublishRequest,
    pb::AckRequest,
    pb::RequestRequest,
    pb::CreateTopicRequest,
    pb::DeleteTopicRequest,
);

/// A batch's namespace when its messages share one; its target counts messages and topics.
impl Target for pb::PublishBatchRequest {
    fn namespace(&self) -> Option<String> {
        let mut namespaces = self
            .messages
            .iter()
            .map(|m| colony_proto::messaging::namespace_or_default(&m.namespace));
        let first = namespaces.next()?;
        namespaces.all(|n| n == first).then_some(first)
    }

    fn target(&self) -> Option<String> {
        let first = &self.messages.first()?.topic;
        Some(match self.messages.iter().all(|m| &m.topic == first) {
            true => format!("{} messages to topic {first:?}", self.messages.len()),
            false => format!("{} messages to several topics", self.messages.len()),
        })
    }
}

impl Target for pb::ReceiveRequest {
    fn namespace(&self) -> Option<String> {
        Some(colony_proto::messaging::namespace_or_default(&self.namespace))
    }

    fn target(&self) -> Option<String> {
        Some(format!("topic {:?} consumer {:?}", self.topic, self.consumer))
    }
}

impl Target for pb::ListTopicsRequest {
    fn namespace(&self) -> Option<String> {
        colony_proto::messaging::non_empty(self.namespace.clone())
    }
}

macro_rules! agent_targeted {
    ($($request:ty),* $(,)?) => {$(
        impl Target for $request {
            fn namespace(&self) -> Option<String> {
                Some(colony_proto::messaging::namespace_or_default(&self.namespace))
            }

            fn target(&self) -> Option<String> {
                Some(format!("agent {:?}", self.name))
            }
        }
    )*};
}

agent_targeted!(
    pb::GetAgentRequest,
    pb::ScaleAgentRequest,
    pb::StopAgentRequest,
    pb::ResolveAgentRequest
);

impl Target for pb::RunAgentRequest {
    fn namespace(&self) -> Option<String> {
        let namespace = self.spec.as_ref().map(|s| s.namespace.as_str()).unwrap_or_default();
        Some(colony_proto::messaging::namespace_or_default(namespace))
    }

    fn target(&self) -> Option<String> {
        self.spec.as_ref().map(|s| format!("agent {:?}", s.name))
    }
}

impl Target for pb::ListAgentsRequest {
    fn namespace(&self) -> Option<String> {
        colony_proto::messaging::non_empty(self.namespace.clone())
    }
}
