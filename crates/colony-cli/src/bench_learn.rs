//! `colony bench learn`: the learner's kernels on the device this machine has: GEMM GFLOP/s at a
//! few sizes and the time of one training step; on a GPU, the same GEMMs through cuBLAS in the
//! same run, for comparison.

use crate::bench::machine;
use crate::output::{self, OutputFormat};
use crate::GlobalArgs;
use anyhow::{Context as _, Result};
use clap::Args;
use colony_learn::{Backend, Device, MlpConfig, SelectedBackend};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct LearnBenchArgs {
    /// auto (a GPU when one is usable, else the CPU), cpu, or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Repetitions per measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    reps: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: crate::bench::Machine,
    device: String,
    gemm: Vec<Gemm>,
    /// The learner's default model (32x32 hidden) on 1,024-row batches.
    train_step_ms: f64,
}

#[derive(Debug, Serialize)]
struct Gemm {
    m: usize,
    k: usize,
    n: usize,
    gflops: f64,
    /// The same GEMM through cuBLAS (GPU only).
    cublas_gflops: Option<f64>,
}

const SIZES: [(usize, usize, usize); 3] = [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024)];

fn measure<B: Backend>(backend: &B, reps: usize) -> Result<(Vec<Gemm>, f64)> {
    let mut gemm = Vec::new();
    for (m, k, n) in SIZES {
        let gflops = colony_learn::bench::gemm_gflops(backend, m, k, n, reps)
            .with_context(|| format!("GEMM {m}x{k}x{n}"))?;
        gemm.push(Gemm { m, k, n, gflops, cublas_gflops: None });
    }
    let config = MlpConfig {
        inputs: colony_model::features::FEATURES,
        hidden: vec![32, 32],
        outputs: 2,
        seed: 1,
    };
    let step = colony_learn::bench::train_step_time(backend, &config, 1024, reps)
        .context("training step")?;
    Ok((gemm, step.as_secs_f64() * 1000.0))
}

pub async fn run(args: LearnBenchArgs, global: &GlobalArgs) -> Result<()> {
    let device: Device = args.device.parse().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let selected = device.resolve().context("cannot open the device")?;
    let reps = args.reps as usize;
    let (name, (gemm, train_step_ms)) = match &selected {
        SelectedBackend::Cpu(cpu) => ("cpu".to_owned(), measure(cpu, reps)?),
        SelectedBackend::Cuda(gpu) => {
            let (mut gemm, step) = measure(gpu.as_ref(), reps)?;
            for g in &mut gemm {
                g.cublas_gflops = Some(
                    colony_learn::gpu::cublas_gemm_gflops(gpu, g.m, g.k, g.n, reps)
                        .context("cuBLAS")?,
                );
            }
            (gpu.describe(), (gemm, step))
        }
    };
    let report = Report { machine: machine(), device: name, gemm, train_step_ms };
    match global.output {
        OutputFormat::Json => output::print_json(&report),
        OutputFormat::Table => {
            output::out(format!(
                "machine: {} ({} cores, {}); device: {}",
                report.machine.cpu_model,
                report.machine.cores,
                report.machine.hostname,
                report.device
            ))?;
            let mut table = output::table(["GEMM (m x k x n)", "GFLOP/s", "CUBLAS GFLOP/s"]);
            for g in &report.gemm {
                let cublas = g
                    .cublas_gflops
                    .map_or_else(|| "- (GPU only)".to_owned(), |x| format!("{x:.2}"));
                table.add_row(vec![
                    format!("{} x {} x {}", g.m, g.k, g.n),
                    format!("{:.2}", g.gflops),
                    cublas,
                ]);
            }
            output::print_table(table)?;
            output::out(format!(
                "training step (32x32 MLP, 1,024 rows): {:.3} ms",
                report.train_step_ms
            ))
        }
    }
}
