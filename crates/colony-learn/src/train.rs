//! Training: the forward pass, backpropagation of the MSE loss and Adam, written once over the
//! [`Backend`] primitives so the CPU and the GPU run the same algorithm step for step.
//!
//! With layer l computing Z_l = H_{l-1}·W_l + b_l and H_l = ReLU(Z_l) (no ReLU on the last):
//! dW_l = H_{l-1}ᵀ·dZ_l (`gemm_atb`), db_l = column sums of dZ_l, and
//! dZ_{l-1} = (dZ_l·W_lᵀ) masked where H_{l-1} is zero (`gemm_abt`, `relu_backward`).

use colony_model::{Layer, Mlp, MlpError};
use thiserror::Error;

use crate::adam::{AdamConfig, AdamError};
use crate::backend::{Backend, BackendError, Epilogue, GemmDims};

/// The most rows one training step or prediction may take.
pub const BATCH_ROWS_MAX: usize = 65_536;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("the model is not valid")]
    Model(#[from] MlpError),
    #[error("the optimiser settings are not valid")]
    Adam(#[from] AdamError),
    #[error("a backend operation failed")]
    Backend(#[from] BackendError),
    #[error("a batch of {rows} rows is outside 1..={max}")]
    BatchRows { rows: usize, max: usize },
    #[error("{what} holds {actual} values, expected {expected}")]
    Input { what: &'static str, expected: usize, actual: usize },
}

/// A weight matrix and bias vector in backend buffers: parameters, gradients or Adam moments.
struct LayerBuffers<T> {
    w: T,
    b: T,
}

/// Per-batch-size scratch: activations H_0 (the input) .. H_L, the deltas dZ_l, the
/// back-propagated dH_{l-1} for l ≥ 1, and the targets.
struct Workspace<T> {
    rows: usize,
    activations: Vec<T>,
    deltas: Vec<T>,
    back: Vec<T>,
    target: T,
}

/// Trains one model on one backend. The weights, gradients and Adam moments stay in the
/// backend's memory between steps; [`Trainer::to_mlp`] copies the weights out.
pub struct Trainer<'b, B: Backend> {
    backend: &'b B,
    /// (inputs, outputs) per layer.
    shapes: Vec<(usize, usize)>,
    params: Vec<LayerBuffers<B::Buffer>>,
    grads: Vec<LayerBuffers<B::Buffer>>,
    first_moments: Vec<LayerBuffers<B::Buffer>>,
    second_moments: Vec<LayerBuffers<B::Buffer>>,
    adam: AdamConfig,
    step: u64,
    workspace: Option<Workspace<B::Buffer>>,
}

impl<'b, B: Backend> Trainer<'b, B> {
    pub fn new(backend: &'b B, mlp: &Mlp, adam: AdamConfig) -> Result<Self, TrainError> {
        mlp.validate()?;
        adam.validate()?;
        let shapes: Vec<(usize, usize)> =
            mlp.layers.iter().map(|layer| (layer.inputs, layer.outputs)).collect();
        let params = mlp
            .layers
            .iter()
            .map(|layer| {
                Ok(LayerBuffers { w: backend.upload(&layer.w)?, b: backend.upload(&layer.b)? })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let zeroed = || {
            shapes
                .iter()
                .map(|&(inputs, outputs)| {
                    Ok(LayerBuffers {
                        w: backend.zeros(inputs * outputs)?,
                        b: backend.zeros(outputs)?,
                    })
                })
                .collect::<Result<Vec<_>, BackendError>>()
        };
        Ok(Self {
            backend,
            grads: zeroed()?,
            first_moments: zeroed()?,
            second_moments: zeroed()?,
            shapes,
            params,
            adam,
            step: 0,
            workspace: None,
        })
    }

    /// Adam steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn inputs(&self) -> usize {
        self.shapes.first().map_or(0, |&(inputs, _)| inputs)
    }

    pub fn outputs(&self) -> usize {
        self.shapes.last().map_or(0, |&(_, outputs)| outputs)
    }

    /// One Adam step on the batch `x` (`rows x inputs`) with targets `y` (`rows x outputs`).
    /// Returns the loss before the step.
    pub fn train_step(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<f32, TrainError> {
        let loss = self.compute_gradients(x, y, rows)?;
        self.step += 1;
        for (layer, grad) in self.grads.iter().enumerate() {
            let param = &mut self.params[layer];
            let m = &mut self.first_moments[layer];
            let v = &mut self.second_moments[layer];
            self.backend.adam_update(
                &mut param.w,
                &grad.w,
                &mut m.w,
                &mut v.w,
                &self.adam,
                self.step,
            )?;
            self.backend.adam_update(
                &mut param.b,
                &grad.b,
                &mut m.b,
                &mut v.b,
                &self.adam,
                self.step,
            )?;
        }
        Ok(loss)
    }

    /// The loss on a batch and its gradient with respect to every parameter, without a step.
    pub fn gradients(
        &mut self,
        x: &[f32],
        y: &[f32],
        rows: usize,
    ) -> Result<(f32, Vec<Layer>), TrainError> {
        let loss = self.compute_gradients(x, y, rows)?;
        let layers = self
            .shapes
            .iter()
            .zip(&self.grads)
            .map(|(&(inputs, outputs), grad)| {
                Ok(Layer {
                    inputs,
                    outputs,
                    w: self.backend.download(&grad.w)?,
                    b: self.backend.download(&grad.b)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok((loss, layers))
    }

    /// Predictions for `rows` samples with the current weights.
    pub fn predict(&mut self, x: &[f32], rows: usize) -> Result<Vec<f32>, TrainError> {
        let workspace = prepare(self.backend, &self.shapes, &mut self.workspace, x, None, rows)?;
        forward(self.backend, &self.shapes, &self.params, workspace)?;
        let output = &workspace.activations[self.shapes.len()];
        Ok(self.backend.download(output)?)
    }

    /// The current weights as a validated model: a step that produced NaN or infinity is an
    /// error here, so such weights never reach the registry.
    pub fn to_mlp(&self) -> Result<Mlp, TrainError> {
        let layers = self
            .shapes
            .iter()
            .zip(&self.params)
            .map(|(&(inputs, outputs), param)| {
                Ok(Layer {
                    inputs,
                    outputs,
                    w: self.backend.download(&param.w)?,
                    b: self.backend.download(&param.b)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let mlp = Mlp { layers };
        mlp.validate()?;
        Ok(mlp)
    }

    /// Runs forward and backward on the batch and leaves the gradients in `self.grads`.
    fn compute_gradients(&mut self, x: &[f32], y: &[f32], rows: usize) -> Result<f32, TrainError> {
        let workspace = prepare(self.backend, &self.shapes, &mut self.workspace, x, Some(y), rows)?;
        forward(self.backend, &self.shapes, &self.params, workspace)?;
        Ok(backward(self.backend, &self.shapes, &self.params, &mut self.grads, workspace)?)
    }
}

/// Checks the batch, reuses or reallocates the workspace for its size, and copies it in.
fn prepare<'w, B: Backend>(
    backend: &B,
    shapes: &[(usize, usize)],
    slot: &'w mut Option<Workspace<B::Buffer>>,
    x: &[f32],
    y: Option<&[f32]>,
    rows: usize,
) -> Result<&'w mut Workspace<B::Buffer>, TrainError> {
    if !(1..=BATCH_ROWS_MAX).contains(&rows) {
        return Err(TrainError::BatchRows { rows, max: BATCH_ROWS_MAX });
    }
    let inputs = shapes.first().map_or(0, |&(inputs, _)| inputs);
    let outputs = shapes.last().map_or(0, |&(_, outputs)| outputs);
    // rows and both widths are bounded, so these products cannot overflow.
    if x.len() != rows * inputs {
        return Err(TrainError::Input { what: "x", expected: rows * inputs, actual: x.len() });
    }
    if let Some(y) = y {
        if y.len() != rows * outputs {
            return Err(TrainError::Input { what: "y", expected: rows * outputs, actual: y.len() });
        }
    }
    let workspace = match slot.take() {
        Some(workspace) if workspace.rows == rows => slot.insert(workspace),
        _ => slot.insert(allocate_workspace(backend, shapes, rows)?),
    };
    backend.write(x, &mut workspace.activations[0])?;
    if let Some(y) = y {
        backend.write(y, &mut workspace.target)?;
    }
    Ok(workspace)
}

fn allocate_workspace<B: Backend>(
    backend: &B,
    shapes: &[(usize, usize)],
    rows: usize,
) -> Result<Workspace<B::Buffer>, BackendError> {
    let inputs = shapes.first().map_or(0, |&(inputs, _)| inputs);
    let outputs = shapes.last().map_or(0, |&(_, outputs)| outputs);
    let activations = std::iter::once(inputs)
        .chain(shapes.iter().map(|&(_, outputs)| outputs))
        .map(|width| backend.zeros(rows * width))
        .collect::<Result<Vec<_>, _>>()?;
    let deltas = shapes
        .iter()
        .map(|&(_, outputs)| backend.zeros(rows * outputs))
        .collect::<Result<Vec<_>, _>>()?;
    let back = shapes
        .iter()
        .skip(1)
        .map(|&(inputs, _)| backend.zeros(rows * inputs))
        .collect::<Result<Vec<_>, _>>()?;
    let target = backend.zeros(rows * outputs)?;
    Ok(Workspace { rows, activations, deltas, back, target })
}

/// H_l = ReLU(H_{l-1}·W_l + b_l), linear on the last layer.
fn forward<B: Backend>(
    backend: &B,
    shapes: &[(usize, usize)],
    params: &[LayerBuffers<B::Buffer>],
    workspace: &mut Workspace<B::Buffer>,
) -> Result<(), BackendError> {
    let last = shapes.len() - 1;
    for (layer, (&(inputs, outputs), param)) in shapes.iter().zip(params).enumerate() {
        let (done, rest) = workspace.activations.split_at_mut(layer + 1);
        backend.gemm_ab(
            &done[layer],
            &param.w,
            GemmDims { m: workspace.rows, k: inputs, n: outputs },
            Epilogue { bias: Some(&param.b), relu: layer != last },
            &mut rest[0],
        )?;
    }
    Ok(())
}

/// The loss of the forward pass in `workspace`, with every parameter's gradient left in `grads`.
fn backward<B: Backend>(
    backend: &B,
    shapes: &[(usize, usize)],
    params: &[LayerBuffers<B::Buffer>],
    grads: &mut [LayerBuffers<B::Buffer>],
    workspace: &mut Workspace<B::Buffer>,
) -> Result<f32, BackendError> {
    let rows = workspace.rows;
    let last = shapes.len() - 1;
    let loss = backend.mse_loss_and_grad(
        &workspace.activations[last + 1],
        &workspace.target,
        &mut workspace.deltas[last],
    )?;
    for layer in (0..=last).rev() {
        let (inputs, outputs) = shapes[layer];
        let grad = &mut grads[layer];
        let delta = &workspace.deltas[layer];
        backend.gemm_atb(
            &workspace.activations[layer],
            delta,
            GemmDims { m: inputs, k: rows, n: outputs },
            Epilogue::none(),
            &mut grad.w,
        )?;
        backend.column_sums(delta, rows, outputs, &mut grad.b)?;
        if layer > 0 {
            let back = &mut workspace.back[layer - 1];
            backend.gemm_abt(
                delta,
                &params[layer].w,
                GemmDims { m: rows, k: outputs, n: inputs },
                Epilogue::none(),
                back,
            )?;
            backend.relu_backward(
                back,
                &workspace.activations[layer],
                &mut workspace.deltas[layer - 1],
            )?;
        }
    }
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::init::{new_mlp, MlpConfig};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Samples of y = (sin(x0) + x1·x2, x0² - x2) with x uniform in [-1, 1]³.
    pub(crate) fn synthetic(seed: u64, rows: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..rows * 3).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let y = x
            .chunks_exact(3)
            .flat_map(|s| [s[0].sin() + s[1] * s[2], s[0] * s[0] - s[2]])
            .collect();
        (x, y)
    }

    /// A layer's parameters in f64, for the finite-difference reference.
    struct Layer64 {
        inputs: usize,
        outputs: usize,
        w: Vec<f64>,
        b: Vec<f64>,
    }

    /// The MSE loss computed entirely in f64, and the sign of every hidden pre-activation (a
    /// central difference across a ReLU kink is meaningless, so such parameters are skipped).
    fn loss64(layers: &[Layer64], x: &[f32], y: &[f32], rows: usize) -> (f64, Vec<bool>) {
        let mut h: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let mut signs = Vec::new();
        for (index, layer) in layers.iter().enumerate() {
            let mut z = vec![0.0; rows * layer.outputs];
            for r in 0..rows {
                for o in 0..layer.outputs {
                    let mut sum = layer.b[o];
                    for i in 0..layer.inputs {
                        sum += h[r * layer.inputs + i] * layer.w[i * layer.outputs + o];
                    }
                    z[r * layer.outputs + o] = sum;
                }
            }
            if index + 1 < layers.len() {
                signs.extend(z.iter().map(|&v| v > 0.0));
                z.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            h = z;
        }
        let loss = h.iter().zip(y).map(|(&p, &t)| (p - f64::from(t)).powi(2)).sum::<f64>()
            / h.len() as f64;
        (loss, signs)
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<(), TrainError> {
        let mlp = new_mlp(&MlpConfig { inputs: 3, hidden: vec![5, 4], outputs: 2, seed: 5 })?;
        let rows = 6;
        let (x, y) = synthetic(1, rows);
        let mut trainer = Trainer::new(&CpuBackend, &mlp, AdamConfig::default())?;
        let (loss, analytic) = trainer.gradients(&x, &y, rows)?;

        let mut layers: Vec<Layer64> = mlp
            .layers
            .iter()
            .map(|l| Layer64 {
                inputs: l.inputs,
                outputs: l.outputs,
                w: l.w.iter().map(|&v| f64::from(v)).collect(),
                b: l.b.iter().map(|&v| f64::from(v)).collect(),
            })
            .collect();
        let (loss_reference, _) = loss64(&layers, &x, &y, rows);
        assert!((f64::from(loss) - loss_reference).abs() <= 1e-6 * loss_reference);

        const H: f64 = 1e-4;
        let (mut checked, mut skipped, mut worst) = (0, 0, 0.0_f64);
        for layer in 0..layers.len() {
            for is_bias in [false, true] {
                let count = if is_bias { layers[layer].b.len() } else { layers[layer].w.len() };
                for index in 0..count {
                    let mut evaluate = |delta: f64| {
                        let params =
                            if is_bias { &mut layers[layer].b } else { &mut layers[layer].w };
                        let original = params[index];
                        params[index] = original + delta;
                        let result = loss64(&layers, &x, &y, rows);
                        let params =
                            if is_bias { &mut layers[layer].b } else { &mut layers[layer].w };
                        params[index] = original;
                        result
                    };
                    let (plus, plus_signs) = evaluate(H);
                    let (minus, minus_signs) = evaluate(-H);
                    if plus_signs != minus_signs {
                        skipped += 1;
                        continue;
                    }
                    let numeric = (plus - minus) / (2.0 * H);
                    let grads = &analytic[layer];
                    let exact = f64::from(if is_bias { grads.b[index] } else { grads.w[index] });
                    let error = (exact - numeric).abs() / (exact.abs() + numeric.abs()).max(1e-3);
                    worst = worst.max(error);
                    assert!(
                        error < 1e-3,
                        "layer {layer} {} [{index}]: backprop {exact} vs finite difference {numeric}",
                        if is_bias { "b" } else { "w" },
                    );
                    checked += 1;
                }
            }
        }
        eprintln!("gradient check: {checked} parameters, {skipped} skipped at ReLU kinks, worst relative error {worst:.2e}");
        assert!(skipped * 10 < checked, "too many parameters sat on ReLU kinks");
        Ok(())
    }

    fn loss_curve(steps: usize) -> Result<(Vec<f32>, Mlp), TrainError> {
        let mlp = new_mlp(&MlpConfig { inputs: 3, hidden: vec![32, 32], outputs: 2, seed: 3 })?;
        let rows = 256;
        let (x, y) = synthetic(2, rows);
        let adam = AdamConfig { lr: 1e-2, ..AdamConfig::default() };
        let mut trainer = Trainer::new(&CpuBackend, &mlp, adam)?;
        let losses =
            (0..steps).map(|_| trainer.train_step(&x, &y, rows)).collect::<Result<Vec<_>, _>>()?;
        assert_eq!(trainer.step_count(), steps as u64);
        Ok((losses, trainer.to_mlp()?))
    }

    #[test]
    fn cpu_training_learns_a_known_function() -> Result<(), TrainError> {
        let (losses, trained) = loss_curve(300)?;
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        eprintln!("cpu training: loss {first:.4} -> {last:.5} in {} steps", losses.len());
        assert!(last < 0.05 * first, "loss only fell from {first} to {last}");
        // The same seed gives bit-identical training.
        assert_eq!(loss_curve(300)?.0, losses);
        // Generalises to fresh samples of the same function.
        let (x, y) = synthetic(99, 128);
        let predictions = trained.predict(&x, 128)?;
        let (held_out, _) =
            crate::cpu::mse_loss_and_grad(&predictions, &y).map_err(BackendError::from)?;
        assert!(held_out < 0.1 * first, "held-out loss {held_out}");
        Ok(())
    }

    #[test]
    fn trainer_predicts_like_the_model() -> Result<(), TrainError> {
        let mlp = new_mlp(&MlpConfig { inputs: 3, hidden: vec![8], outputs: 2, seed: 8 })?;
        let (x, _) = synthetic(4, 10);
        let mut trainer = Trainer::new(&CpuBackend, &mlp, AdamConfig::default())?;
        assert_eq!(trainer.predict(&x, 10)?, mlp.predict(&x, 10)?);
        // A batch of another size reallocates the workspace and still agrees.
        assert_eq!(trainer.predict(&x[..9], 3)?, mlp.predict(&x[..9], 3)?);
        Ok(())
    }

    #[test]
    fn trainer_rejects_bad_batches() -> Result<(), TrainError> {
        let mlp = new_mlp(&MlpConfig { inputs: 3, hidden: vec![4], outputs: 2, seed: 1 })?;
        let mut trainer = Trainer::new(&CpuBackend, &mlp, AdamConfig::default())?;
        assert!(matches!(
            trainer.train_step(&[], &[], 0),
            Err(TrainError::BatchRows { rows: 0, .. })
        ));
        assert!(matches!(
            trainer.train_step(&[0.0; 6], &[0.0; 3], 2),
            Err(TrainError::Input { what: "y", expected: 4, actual: 3 })
        ));
        assert!(matches!(
            trainer.predict(&[0.0; 5], 2),
            Err(TrainError::Input { what: "x", expected: 6, actual: 5 })
        ));
        let big = BATCH_ROWS_MAX + 1;
        assert!(matches!(trainer.predict(&[], big), Err(TrainError::BatchRows { .. })));
        assert_eq!(trainer.step_count(), 0);
        let bad_adam = AdamConfig { lr: -1.0, ..AdamConfig::default() };
        assert!(matches!(Trainer::new(&CpuBackend, &mlp, bad_adam), Err(TrainError::Adam(_))));
        Ok(())
    }
}
