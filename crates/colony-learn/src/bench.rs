//! Micro-benchmarks for `colony bench learn`: GEMM throughput and the time of one training step,
//! on any backend.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::adam::AdamConfig;
use crate::backend::{Backend, BackendError, Epilogue, GemmDims};
use crate::init::{new_mlp, MlpConfig};
use crate::train::{TrainError, Trainer};

/// The most timed repetitions one benchmark runs.
pub const REPS_MAX: usize = 100_000;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("{reps} repetitions is outside 1..={max}")]
    Reps { reps: usize, max: usize },
    #[error("the backend failed")]
    Backend(#[from] BackendError),
    #[error("training failed")]
    Train(#[from] TrainError),
}

fn check_reps(reps: usize) -> Result<(), BenchError> {
    if (1..=REPS_MAX).contains(&reps) {
        Ok(())
    } else {
        Err(BenchError::Reps { reps, max: REPS_MAX })
    }
}

/// Deterministic values in [-0.5, 0.5): benchmark inputs need no randomness, only no zeros.
fn filler(len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + salt * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// GFLOP/s of C = A·B (2·m·k·n flops each) averaged over `reps` runs after one warm-up run.
pub fn gemm_gflops<B: Backend>(
    backend: &B,
    m: usize,
    k: usize,
    n: usize,
    reps: usize,
) -> Result<f64, BenchError> {
    check_reps(reps)?;
    let a = backend.upload(&filler(m * k, 1))?;
    let b = backend.upload(&filler(k * n, 2))?;
    let mut c = backend.zeros(m * n)?;
    let dims = GemmDims { m, k, n };
    backend.gemm_ab(&a, &b, dims, Epilogue::none(), &mut c)?;
    backend.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        backend.gemm_ab(&a, &b, dims, Epilogue::none(), &mut c)?;
    }
    backend.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    let flops = 2.0 * m as f64 * k as f64 * n as f64 * reps as f64;
    Ok(flops / seconds / 1e9)
}

/// The mean time of one training step (forward, backward, Adam and reading the loss back) for a
/// model of this shape on `rows`-row batches, after one warm-up step.
pub fn train_step_time<B: Backend>(
    backend: &B,
    config: &MlpConfig,
    rows: usize,
    reps: usize,
) -> Result<Duration, BenchError> {
    check_reps(reps)?;
    let mlp = new_mlp(config).map_err(TrainError::from)?;
    let mut trainer = Trainer::new(backend, &mlp, AdamConfig::default())?;
    let x = filler(rows * mlp.inputs(), 3);
    let y = filler(rows * mlp.outputs(), 4);
    trainer.train_step(&x, &y, rows)?;
    backend.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        trainer.train_step(&x, &y, rows)?;
    }
    backend.synchronize()?;
    // reps is at most REPS_MAX, so it fits in u32.
    Ok(start.elapsed() / reps as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    #[test]
    fn benchmarks_run_on_the_cpu() -> Result<(), BenchError> {
        let gflops = gemm_gflops(&CpuBackend, 33, 17, 65, 3)?;
        assert!(gflops.is_finite() && gflops > 0.0);
        let config = MlpConfig { inputs: 8, hidden: vec![16, 16], outputs: 2, seed: 1 };
        let step = train_step_time(&CpuBackend, &config, 64, 3)?;
        assert!(step > Duration::ZERO);
        assert!(matches!(gemm_gflops(&CpuBackend, 1, 1, 1, 0), Err(BenchError::Reps { .. })));
        Ok(())
    }
}
