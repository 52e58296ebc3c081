//! One training round as a pure function: split the examples, train a fresh model, evaluate it, the
//! baseline and the current model on the same holdout, and decide whether to publish.
//!
//! The split hashes each task's id, so a task stays on the same side in every round: the holdout
//! of this round was never trained on by this model nor by the current one (which used the same
//! split), and the comparison between them is fair. Training standardizes features and targets
//! with the training set's means and deviations, and folds that scaling into the first and last
//! layers afterwards, so the published model takes raw features and gives raw targets.

use colony_model::features::{fnv1a64, FEATURES, TARGETS};
use colony_model::{Mlp, MlpError, ModelError, Predictor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use thiserror::Error;

use crate::adam::AdamConfig;
use crate::backend::Backend;
use crate::baseline::Baseline;
use crate::example::Example;
use crate::init::{new_mlp, MlpConfig};
use crate::train::{TrainError, Trainer, BATCH_ROWS_MAX};

/// The most Adam steps one round may take, whatever the configuration says.
pub const STEPS_MAX: usize = 1_000_000;
/// The split's resolution: a task is held out when its hash falls in the first
/// `holdout_fraction · SPLIT_BUCKETS` buckets.
const SPLIT_BUCKETS: u64 = 10_000;

/// How a round trains and what counts as better.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Hidden layer widths.
    pub hidden: Vec<usize>,
    /// Adam steps per round, each on one minibatch.
    pub steps: usize,
    /// Rows per minibatch (fewer when the training set is smaller).
    pub batch_rows: usize,
    pub adam: AdamConfig,
    /// The share of tasks held out for evaluation, in (0, 1).
    pub holdout_fraction: f64,
    /// The relative improvement a new model needs over both the baseline and the current model:
    /// 0.01 means its holdout MSE must be at least 1% lower. Keeps near-identical models from
    /// churning through registry versions.
    pub improvement_min: f64,
    /// Seeds the initial weights and the minibatch order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            hidden: vec![32, 32],
            steps: 2_000,
            batch_rows: 256,
            adam: AdamConfig { lr: 3e-3, ..AdamConfig::default() },
            holdout_fraction: 0.2,
            improvement_min: 0.01,
            seed: 1,
        }
    }
}

#[derive(Debug, Error)]
pub enum DecideError {
    #[error("holdout fraction {fraction} is outside (0, 1)")]
    HoldoutFraction { fraction: f64 },
    #[error("improvement minimum {value} is outside [0, 1)")]
    ImprovementMin { value: f64 },
    #[error("{steps} training steps is outside 1..={max}")]
    Steps { steps: usize, max: usize },
    #[error("a minibatch of {rows} rows is outside 1..={max}")]
    BatchRows { rows: usize, max: usize },
    #[error(
        "the split left {train_rows} training and {holdout_rows} holdout rows; both need some"
    )]
    EmptySplit { train_rows: usize, holdout_rows: usize },
    #[error("training failed")]
    Train(#[from] TrainError),
    #[error("the trained model is unusable")]
    Model(#[from] ModelError),
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), DecideError> {
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction < 1.0) {
            return Err(DecideError::HoldoutFraction { fraction: self.holdout_fraction });
        }
        if !(0.0..1.0).contains(&self.improvement_min) {
            return Err(DecideError::ImprovementMin { value: self.improvement_min });
        }
        if !(1..=STEPS_MAX).contains(&self.steps) {
            return Err(DecideError::Steps { steps: self.steps, max: STEPS_MAX });
        }
        if !(1..=BATCH_ROWS_MAX).contains(&self.batch_rows) {
            return Err(DecideError::BatchRows { rows: self.batch_rows, max: BATCH_ROWS_MAX });
        }
        self.adam.validate().map_err(TrainError::from)?;
        // The shape is checked by building it once; the seed does not matter here.
        new_mlp(&self.mlp_config()).map_err(TrainError::from)?;
        Ok(())
    }

    fn mlp_config(&self) -> MlpConfig {
        MlpConfig {
            inputs: FEATURES,
            hidden: self.hidden.clone(),
            outputs: TARGETS,
            seed: self.seed,
        }
    }
}

/// Whether this task belongs to the holdout set.
pub fn is_holdout(task_id: u64, holdout_fraction: f64) -> bool {
    let threshold = (holdout_fraction * SPLIT_BUCKETS as f64) as u64;
    fnv1a64(&task_id.to_le_bytes()) % SPLIT_BUCKETS < threshold
}

/// Holdout mean squared errors, averaged over both targets, in target space.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub holdout_mse: f64,
    pub baseline_mse: f64,
    /// The current model's, when there is one of this schema.
    pub previous_mse: Option<f64>,
    pub train_rows: usize,
    pub holdout_rows: usize,
}

impl Evaluation {
    /// holdout / baseline: above 1 the model is worse than the per-kind mean.
    pub fn error_ratio(&self) -> f64 {
        if self.baseline_mse > 0.0 {
            self.holdout_mse / self.baseline_mse
        } else if self.holdout_mse > 0.0 {
            f64::INFINITY
        } else {
            1.0
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Publish,
    NotBetterThanBaseline,
    NotBetterThanCurrent,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Publish => "publish",
            Verdict::NotBetterThanBaseline => "not better than the baseline",
            Verdict::NotBetterThanCurrent => "not better than the current model",
        }
    }
}

/// A trained model, how it did, and what to do with it.
#[derive(Clone, Debug)]
pub struct Decision {
    pub model: Predictor,
    pub evaluation: Evaluation,
    pub verdict: Verdict,
}

/// Trains a fresh model on `examples` with `backend` and decides whether it should replace
/// `current`.
pub fn decide<B: Backend>(
    backend: &B,
    examples: &[Example],
    current: Option<&Predictor>,
    config: &TrainConfig,
) -> Result<Decision, DecideError> {
    config.validate()?;
    let (holdout, train): (Vec<&Example>, Vec<&Example>) =
        examples.iter().partition(|example| is_holdout(example.task_id, config.holdout_fraction));
    if train.is_empty() || holdout.is_empty() {
        return Err(DecideError::EmptySplit {
            train_rows: train.len(),
            holdout_rows: holdout.len(),
        });
    }
    let model = Predictor::from_mlp(train_model(backend, &train, config)?)?;
    let baseline = Baseline::fit(train.iter().copied());
    let evaluation = Evaluation {
        holdout_mse: mse(&holdout, |example| model.predict_targets(&example.features)),
        baseline_mse: mse(&holdout, |example| baseline.predict(&example.kind)),
        previous_mse: current
            .map(|current| mse(&holdout, |example| current.predict_targets(&example.features))),
        train_rows: train.len(),
        holdout_rows: holdout.len(),
    };
    let beats = |other: f64| evaluation.holdout_mse < other * (1.0 - config.improvement_min);
    let verdict = if !beats(evaluation.baseline_mse) {
        Verdict::NotBetterThanBaseline
    } else if evaluation.previous_mse.is_some_and(|previous| !beats(previous)) {
        Verdict::NotBetterThanCurrent
    } else {
        Verdict::Publish
    };
    Ok(Decision { model, evaluation, verdict })
}

fn mse(examples: &[&Example], predict: impl Fn(&Example) -> [f32; TARGETS]) -> f64 {
    let total: f64 = examples
        .iter()
        .map(|example| {
            predict(example)
                .iter()
                .zip(&example.targets)
                .map(|(&p, &t)| (f64::from(p) - f64::from(t)).powi(2))
                .sum::<f64>()
        })
        .sum();
    total / (examples.len() * TARGETS) as f64
}

/// Per-column mean and standard deviation (1 where a column is constant, so it passes through).
fn standardization<const N: usize>(rows: impl Iterator<Item = [f32; N]> + Clone) -> Scaling<N> {
    let mut mean = [0.0_f64; N];
    let mut count = 0.0;
    for row in rows.clone() {
        for (sum, &value) in mean.iter_mut().zip(&row) {
            *sum += f64::from(value);
        }
        count += 1.0;
    }
    mean.iter_mut().for_each(|sum| *sum /= count);
    let mut variance = [0.0_f64; N];
    for row in rows {
        for ((sum, &value), &mu) in variance.iter_mut().zip(&row).zip(&mean) {
            *sum += (f64::from(value) - mu).powi(2);
        }
    }
    Scaling {
        mean: mean.map(|mu| mu as f32),
        std: variance.map(|sum| {
            let std = (sum / count).sqrt() as f32;
            if std > 1e-6 {
                std
            } else {
                1.0
            }
        }),
    }
}

#[derive(Clone, Copy, Debug)]
struct Scaling<const N: usize> {
    mean: [f32; N],
    std: [f32; N],
}

impl<const N: usize> Scaling<N> {
    fn apply<'a>(&'a self, row: &'a [f32; N]) -> impl Iterator<Item = f32> + 'a {
        row.iter()
            .zip(self.mean.iter().zip(&self.std))
            .map(|(&value, (&mean, &std))| (value - mean) / std)
    }
}

fn train_model<B: Backend>(
    backend: &B,
    train: &[&Example],
    config: &TrainConfig,
) -> Result<Mlp, TrainError> {
    let inputs = standardization(train.iter().map(|example| example.features));
    let outputs = standardization(train.iter().map(|example| example.targets));
    let x: Vec<f32> = train.iter().flat_map(|example| inputs.apply(&example.features)).collect();
    let y: Vec<f32> = train.iter().flat_map(|example| outputs.apply(&example.targets)).collect();
    let mut trainer = Trainer::new(backend, &new_mlp(&config.mlp_config())?, config.adam)?;
    // Every step takes a full minibatch, so the trainer's workspace is allocated once.
    let rows = config.batch_rows.min(train.len());
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut next = order.len();
    let (mut batch_x, mut batch_y) =
        (Vec::with_capacity(rows * FEATURES), Vec::with_capacity(rows * TARGETS));
    for _ in 0..config.steps {
        if next + rows > order.len() {
            order.shuffle(&mut rng);
            next = 0;
        }
        batch_x.clear();
        batch_y.clear();
        for &row in &order[next..next + rows] {
            batch_x.extend_from_slice(&x[row * FEATURES..(row + 1) * FEATURES]);
            batch_y.extend_from_slice(&y[row * TARGETS..(row + 1) * TARGETS]);
        }
        next += rows;
        trainer.train_step(&batch_x, &batch_y, rows)?;
    }
    Ok(fold(trainer.to_mlp()?, &inputs, &outputs)?)
}

/// Folds the standardization into the weights: with x' = (x − μ)/σ,
/// x'·W + b = x·(W/σ) + (b − (μ/σ)·W) on the first layer, and y = y'·s + m on the last layer
/// means W·s and b·s + m there.
fn fold(
    mut mlp: Mlp,
    inputs: &Scaling<FEATURES>,
    outputs: &Scaling<TARGETS>,
) -> Result<Mlp, MlpError> {
    if let Some(first) = mlp.layers.first_mut() {
        for (input, (&mean, &std)) in inputs.mean.iter().zip(&inputs.std).enumerate() {
            for output in 0..first.outputs {
                let w = &mut first.w[input * first.outputs + output];
                *w /= std;
                first.b[output] -= mean * *w;
            }
        }
    }
    if let Some(last) = mlp.layers.last_mut() {
        for (output, (&mean, &std)) in outputs.mean.iter().zip(&outputs.std).enumerate() {
            for input in 0..last.inputs {
                last.w[input * last.outputs + output] *= std;
            }
            last.b[output] = last.b[output] * std + mean;
        }
    }
    mlp.validate()?;
    Ok(mlp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::example::tests::finished;
    use crate::example::{example, Rejected};
    use colony_model::features::{self, SCHEMA};
    use colony_model::fixtures::process_task;
    use colony_proto::pb;
    use rand::Rng;

    /// Tasks of six kinds whose runtime and memory depend on the kind and on the size of the
    /// arguments (the rows to process), with declared resources drawn independently of both, so
    /// only a model that reads the arguments beats the per-kind mean. The kinds land in distinct
    /// hash buckets (checked below): two kinds sharing a bucket look alike to the model, which is
    /// the schema's known cost, not what this test is about.
    pub(crate) fn synthetic_records(rows: usize, seed: u64) -> Vec<pb::FinishedTask> {
        let kinds = [
            ("etl", 200.0, 64.0),
            ("train", 5_000.0, 2_048.0),
            ("resize", 50.0, 32.0),
            ("report", 800.0, 128.0),
            ("compile", 1_500.0, 512.0),
            ("backup", 3_000.0, 256.0),
        ];
        let buckets: std::collections::BTreeSet<usize> = kinds
            .iter()
            .map(|(name, ..)| {
                features::features(&process_task(name, &[]), None)[..16]
                    .iter()
                    .position(|&x| x == 1.0)
                    .unwrap_or(usize::MAX)
            })
            .collect();
        assert_eq!(buckets.len(), kinds.len(), "the test's kinds share a bucket");
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows)
            .map(|i| {
                let (name, base_ms, base_mib) = kinds[rng.gen_range(0..kinds.len())];
                let size: usize = rng.gen_range(1..400);
                let arg = "r".repeat(size);
                let mut spec = process_task(&format!("{name}-{i}"), &["--rows", &arg]);
                spec.resources.cpu_millis = rng.gen_range(100..4000);
                spec.resources.memory_bytes = rng.gen_range(64u64..4096) << 20;
                let noise: f64 = rng.gen_range(0.9..1.1);
                let runtime_ms = base_ms * (1.0 + size as f64 / 20.0) * noise;
                let bytes = base_mib * (1.0 + size as f64 / 100.0) * (1u64 << 20) as f64;
                finished(i as u64 + 1, &spec, runtime_ms as u64, Some(bytes as u64))
            })
            .collect()
    }

    fn synthetic(rows: usize, seed: u64) -> Result<Vec<Example>, Rejected> {
        synthetic_records(rows, seed).iter().map(example).collect()
    }

    fn config() -> TrainConfig {
        TrainConfig { steps: 1_500, batch_rows: 128, ..TrainConfig::default() }
    }

    #[test]
    fn split_is_deterministic_and_near_the_fraction() {
        let held = (0..10_000u64).filter(|&id| is_holdout(id, 0.2)).count();
        assert!((1_800..2_200).contains(&held), "{held}");
        assert!((0..100u64).all(|id| is_holdout(id, 0.2) == is_holdout(id, 0.2)));
    }

    #[test]
    fn folding_matches_standardized_prediction() -> Result<(), Box<dyn std::error::Error>> {
        let examples = synthetic(50, 3)?;
        let refs: Vec<&Example> = examples.iter().collect();
        let inputs = standardization(refs.iter().map(|e| e.features));
        let outputs = standardization(refs.iter().map(|e| e.targets));
        let mlp =
            new_mlp(&MlpConfig { inputs: FEATURES, hidden: vec![8], outputs: TARGETS, seed: 4 })?;
        let folded = fold(mlp.clone(), &inputs, &outputs)?;
        for example in &examples {
            let x: Vec<f32> = inputs.apply(&example.features).collect();
            let standardized = mlp.predict(&x, 1)?;
            let raw = folded.predict(&example.features, 1)?;
            for (k, (&s, &r)) in standardized.iter().zip(&raw).enumerate() {
                let expected = s * outputs.std[k] + outputs.mean[k];
                assert!((expected - r).abs() < 1e-3 * expected.abs().max(1.0), "{expected} vs {r}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_model_that_reads_the_arguments_beats_the_baseline_and_publishes(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let examples = synthetic(1_500, 1)?;
        let decision = decide(&CpuBackend, &examples, None, &config())?;
        let evaluation = &decision.evaluation;
        eprintln!("signal: {evaluation:?}");
        assert_eq!(evaluation.train_rows + evaluation.holdout_rows, examples.len());
        assert!(evaluation.holdout_mse < 0.5 * evaluation.baseline_mse, "{evaluation:?}");
        assert!(evaluation.error_ratio() < 0.5);
        assert_eq!(decision.verdict, Verdict::Publish);

        // The published encoding is what the scheduler loads, and it predicts the same.
        let weights = colony_model::encode_weights(decision.model.mlp());
        let loaded = Predictor::from_model(SCHEMA, &weights)?;
        assert_eq!(&loaded, &decision.model);
        let spec = process_task("train-9", &["--rows", &"r".repeat(200)]);
        let prediction = loaded.predict(&spec, None);
        // train: 5000 ms · (1 + 200/20) = 55 s, 2 GiB · 3 = 6 GiB.
        assert!((20_000.0..150_000.0).contains(&prediction.runtime_ms), "{prediction:?}");
        let gib = (1u64 << 30) as f64;
        assert!((3.0 * gib..12.0 * gib).contains(&prediction.peak_memory_bytes), "{prediction:?}");

        // The same model again is no improvement on itself: the registry keeps the current one.
        let again = decide(&CpuBackend, &examples, Some(&decision.model), &config())?;
        assert_eq!(again.evaluation.previous_mse, Some(evaluation.holdout_mse));
        assert_eq!(again.verdict, Verdict::NotBetterThanCurrent);
        Ok(())
    }

    /// The same round on the GPU reaches the same verdict with a holdout error close to the
    /// CPU's (the kernels round differently, so the models are not bit-identical).
    #[test]
    fn the_gpu_trains_a_model_as_good_as_the_cpu() -> Result<(), Box<dyn std::error::Error>> {
        let Some(cuda) =
            crate::gpu::tests::cuda_or_skip("the_gpu_trains_a_model_as_good_as_the_cpu")
        else {
            return Ok(());
        };
        let examples = synthetic(1_500, 1)?;
        let cpu = decide(&CpuBackend, &examples, None, &config())?;
        let gpu = decide(&cuda, &examples, None, &config())?;
        eprintln!("cpu {:?}\ngpu {:?}", cpu.evaluation, gpu.evaluation);
        assert_eq!(gpu.verdict, Verdict::Publish);
        let ratio = gpu.evaluation.holdout_mse / cpu.evaluation.holdout_mse;
        assert!((0.5..2.0).contains(&ratio), "gpu/cpu holdout mse {ratio}");
        Ok(())
    }

    #[test]
    fn noise_does_not_replace_a_better_model() -> Result<(), Box<dyn std::error::Error>> {
        let mut examples = synthetic(1_500, 2)?;
        let mut targets: Vec<[f32; TARGETS]> = examples.iter().map(|e| e.targets).collect();
        targets.shuffle(&mut StdRng::seed_from_u64(9));
        for (example, shuffled) in examples.iter_mut().zip(targets) {
            example.targets = shuffled;
        }
        // The best constant: the mean of all targets, as a model with zero weights.
        let mean = standardization(examples.iter().map(|e| e.targets)).mean;
        let mut constant =
            new_mlp(&MlpConfig { inputs: FEATURES, hidden: vec![4], outputs: TARGETS, seed: 1 })?;
        for layer in &mut constant.layers {
            layer.w.iter_mut().for_each(|w| *w = 0.0);
        }
        if let Some(last) = constant.layers.last_mut() {
            last.b = mean.to_vec();
        }
        let current = Predictor::from_mlp(constant)?;

        let decision = decide(&CpuBackend, &examples, Some(&current), &config())?;
        let evaluation = &decision.evaluation;
        eprintln!("noise: {evaluation:?} -> {:?}", decision.verdict);
        assert!(evaluation.holdout_mse > 0.9 * evaluation.baseline_mse, "{evaluation:?}");
        assert_ne!(decision.verdict, Verdict::Publish);
        Ok(())
    }

    #[test]
    fn rejects_bad_configs_and_empty_splits() -> Result<(), Rejected> {
        let examples = synthetic(20, 5)?;
        let bad = [
            TrainConfig { holdout_fraction: 0.0, ..config() },
            TrainConfig { holdout_fraction: 1.0, ..config() },
            TrainConfig { steps: 0, ..config() },
            TrainConfig { batch_rows: 0, ..config() },
            TrainConfig { hidden: vec![0], ..config() },
            TrainConfig { improvement_min: 1.0, ..config() },
        ];
        for config in bad {
            assert!(decide(&CpuBackend, &examples, None, &config).is_err(), "{config:?}");
        }
        let only_train: Vec<Example> =
            examples.into_iter().filter(|e| !is_holdout(e.task_id, 0.2)).collect();
        assert!(matches!(
            decide(&CpuBackend, &only_train, None, &config()),
            Err(DecideError::EmptySplit { holdout_rows: 0, .. })
        ));
        // Keeps the import of `features` honest: the examples carry the schema's width.
        assert_eq!(only_train.first().map(|e| e.features.len()), Some(features::FEATURES));
        Ok(())
    }
}
