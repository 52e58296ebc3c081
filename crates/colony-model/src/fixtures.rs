//! Fixtures for tests of the model and of the learner: a process task and an executor whose
//! features are easy to compute by hand, and a small model. Built only for tests and with the
//! `fixtures` feature.

use std::collections::BTreeMap;

use colony_core::{ExecutorSpec, PlacementPolicy, Resources, RunSpec, TaskSpec};

use crate::mlp::{Layer, Mlp};

/// A process task with these args and a 500m / 256Mi request.
pub fn process_task(name: &str, args: &[&str]) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        labels: BTreeMap::new(),
        capabilities: Default::default(),
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        priority: 0,
        deadline_unix_ms: None,
        timeout_ms: None,
        max_retries: 0,
        dependencies: Default::default(),
        run: RunSpec::Process {
            program: "/bin/true".to_owned(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: BTreeMap::new(),
        },
        idempotency_key: None,
        placement: PlacementPolicy::BinPack,
        memory_auto: false,
    }
}

/// An 8-core, 16 GiB executor labelled `zone=a`.
pub fn executor() -> ExecutorSpec {
    ExecutorSpec {
        name: "exec-1".to_owned(),
        capacity: Resources {
            cpu_millis: 8000,
            memory_bytes: 16 << 30,
            gpus: 0,
            custom: BTreeMap::new(),
        },
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        capabilities: Default::default(),
    }
}

/// A model of these widths with fixed weights of both signs, of magnitude at most
/// 1/sqrt(fan-in), and zero biases. Training's seeded initialisation lives in `colony-learn`;
/// this one needs no generator.
pub fn mlp(inputs: usize, hidden: &[usize], outputs: usize) -> Mlp {
    let widths: Vec<usize> = std::iter::once(inputs)
        .chain(hidden.iter().copied())
        .chain(std::iter::once(outputs))
        .collect();
    let layers = widths
        .windows(2)
        .enumerate()
        .map(|(layer, pair)| {
            let (inputs, outputs) = (pair[0], pair[1]);
            let scale = 1.0 / (8.0 * (inputs as f32).sqrt());
            let w = (0..inputs * outputs)
                .map(|index| ((index * 37 + layer * 11) % 17) as f32 - 8.0)
                .map(|step| step * scale)
                .collect();
            Layer { inputs, outputs, w, b: vec![0.0; outputs] }
        })
        .collect();
    Mlp { layers }
}
