//! The naive baseline a model must beat: the mean target of the task's kind in the training set,
//! or the mean over all of it for a kind never seen there.

use std::collections::BTreeMap;

use crate::example::Example;
use colony_model::features::TARGETS;

/// Running sums in f64, so the means do not depend on the order of tens of thousands of rows.
#[derive(Clone, Debug, Default)]
struct Sums {
    total: [f64; TARGETS],
    count: u64,
}

impl Sums {
    fn add(&mut self, targets: &[f32; TARGETS]) {
        for (sum, &value) in self.total.iter_mut().zip(targets) {
            *sum += f64::from(value);
        }
        self.count += 1;
    }

    fn mean(&self) -> [f32; TARGETS] {
        if self.count == 0 {
            return [0.0; TARGETS];
        }
        self.total.map(|sum| (sum / self.count as f64) as f32)
    }
}

/// Per-kind means of the targets (in target space, i.e. of the logarithms).
#[derive(Clone, Debug, PartialEq)]
pub struct Baseline {
    per_kind: BTreeMap<String, [f32; TARGETS]>,
    global: [f32; TARGETS],
}

impl Baseline {
    /// Fits the means; with no examples at all every prediction is zero.
    pub fn fit<'a>(examples: impl IntoIterator<Item = &'a Example>) -> Self {
        let mut global = Sums::default();
        let mut per_kind: BTreeMap<&str, Sums> = BTreeMap::new();
        for example in examples {
            global.add(&example.targets);
            per_kind.entry(example.kind.as_str()).or_default().add(&example.targets);
        }
        Self {
            per_kind: per_kind
                .into_iter()
                .map(|(kind, sums)| (kind.to_owned(), sums.mean()))
                .collect(),
            global: global.mean(),
        }
    }

    /// The predicted targets for a task of this kind.
    pub fn predict(&self, kind: &str) -> [f32; TARGETS] {
        self.per_kind.get(kind).copied().unwrap_or(self.global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_model::features::FEATURES;

    fn example(kind: &str, targets: [f32; TARGETS]) -> Example {
        Example { seq: 0, task_id: 0, kind: kind.to_owned(), features: [0.0; FEATURES], targets }
    }

    #[test]
    fn means_per_kind_and_global_fallback() {
        let examples = [
            example("etl", [2.0, 10.0]),
            example("etl", [4.0, 12.0]),
            example("train", [9.0, 20.0]),
        ];
        let baseline = Baseline::fit(&examples);
        assert_eq!(baseline.predict("etl"), [3.0, 11.0]);
        assert_eq!(baseline.predict("train"), [9.0, 20.0]);
        assert_eq!(baseline.predict("never-seen"), [5.0, 14.0]);
        assert_eq!(Baseline::fit(&[]).predict("etl"), [0.0, 0.0]);
    }
}
