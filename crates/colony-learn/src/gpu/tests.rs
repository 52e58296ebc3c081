//! Tests of the kernels: NVRTC builds (when libnvrtc is present) and agreement with the CPU
//! reference on a real device (when libcuda and a GPU are present). Each prints a loud SKIPPED
//! line instead of passing silently when what it needs is missing.

use std::io::Write;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::backend::{Backend, GemmForm};
use crate::cpu::{self, CpuBackend};
use crate::init::{new_mlp, MlpConfig};
use crate::kernels::{parse_ptxas_log, ENTRY_POINTS};
use crate::train::Trainer;

/// Writes straight to the process's stderr, which the test harness does not capture, so a
/// skipped check shows in every `cargo test` log rather than passing unseen.
pub(crate) fn skipped(test: &str, why: &str) {
    // One write, so that the line does not interleave with the harness's own output.
    let line = format!("SKIPPED: {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc_available() {
        return true;
    }
    skipped(
        test,
        "libnvrtc not found (install nvidia-cuda-nvrtc==13.0.88 and put its nvidia/cu13/lib on \
         LD_LIBRARY_PATH; see gen-ptx.sh)",
    );
    false
}

/// CUDA device 0, or `None` after a SKIPPED line when this machine has no driver or no GPU.
/// Any other failure to open a present device is a test failure.
pub(crate) fn cuda_or_skip(test: &str) -> Option<CudaBackend> {
    if !driver_available() {
        skipped(test, "libcuda not found, so there is no GPU to test on");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(backend) => {
            eprintln!(
                "{test}: on {} with kernels from {:?}",
                backend.describe(),
                backend.kernel_origin()
            );
            Some(backend)
        }
        Err(GpuError::NoDevice { count, .. }) => {
            skipped(test, &format!("libcuda is present but found {count} CUDA devices"));
            None
        }
        Err(error) => panic!("{test}: a CUDA device is present but could not be opened: {error:?}"),
    }
}

#[test]
fn every_kernel_compiles_for_sm_90_without_spills() -> Result<(), GpuError> {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm_90_without_spills") {
        return Ok(());
    }
    let log = ptxas_report("sm_90")?;
    let kernels = parse_ptxas_log(&log);
    for kernel in &kernels {
        eprintln!(
            "ptxas sm_90 {:<22} {:>3} registers, {:>5} bytes smem, {} bytes stack, {} bytes spill stores, {} bytes spill loads",
            kernel.name,
            kernel.registers,
            kernel.shared_bytes,
            kernel.stack_frame_bytes,
            kernel.spill_store_bytes,
            kernel.spill_load_bytes
        );
    }
    for name in ENTRY_POINTS {
        let kernel = kernels
            .iter()
            .find(|kernel| kernel.name == name)
            .unwrap_or_else(|| panic!("ptxas reported nothing for {name}; log:\n{log}"));
        assert_eq!(
            (kernel.spill_store_bytes, kernel.spill_load_bytes),
            (0, 0),
            "{name} spills registers"
        );
        assert_eq!(kernel.stack_frame_bytes, 0, "{name} uses a stack frame");
    }
    Ok(())
}

#[test]
fn checked_in_ptx_is_what_nvrtc_generates() -> Result<(), GpuError> {
    if !nvrtc_or_skip("checked_in_ptx_is_what_nvrtc_generates") {
        return Ok(());
    }
    let version = nvrtc_version();
    if version != Some(kernels::CHECKED_IN_NVRTC_VERSION) {
        skipped(
            "checked_in_ptx_is_what_nvrtc_generates",
            &format!(
                "libnvrtc is {version:?}, the checked-in PTX comes from {:?}",
                kernels::CHECKED_IN_NVRTC_VERSION
            ),
        );
        return Ok(());
    }
    let generated = compile_ptx(kernels::CHECKED_IN_ARCH)?;
    assert!(
        generated == kernels::CHECKED_IN_PTX,
        "kernels/ptx/colony_kernels.ptx is stale: run crates/colony-learn/gen-ptx.sh"
    );
    Ok(())
}

#[test]
fn without_a_driver_new_is_an_error_not_a_panic() {
    if driver_available() {
        skipped("without_a_driver_new_is_an_error_not_a_panic", "libcuda is present");
        return;
    }
    assert!(matches!(CudaBackend::new(0), Err(GpuError::NoDriver)));
}

fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// fp32 agreement: the GPU fuses multiply-adds and sums reductions in another order.
fn assert_close(gpu: &[f32], cpu: &[f32], tolerance: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (index, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= tolerance * (1.0 + c.abs()),
            "{what}[{index}]: GPU {g} vs CPU {c}"
        );
    }
}

/// Element-wise agreement within a per-element bound.
fn assert_within(gpu: &[f32], cpu: &[f32], tolerances: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (index, ((&g, &c), &tolerance)) in gpu.iter().zip(cpu).zip(tolerances).enumerate() {
        assert!(
            (g - c).abs() <= tolerance,
            "{what}[{index}]: GPU {g} vs CPU {c} (allowed {tolerance:e})"
        );
    }
}

fn absolute(values: &[f32]) -> Vec<f32> {
    values.iter().map(|x| x.abs()).collect()
}

/// Shapes around and between multiples of the 32-wide tile, including single rows and columns.
const GEMM_SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (1, 300, 1),
    (7, 5, 3),
    (31, 33, 32),
    (32, 32, 32),
    (33, 17, 65),
    (100, 3, 7),
    (257, 64, 2),
    (5, 129, 300),
    (1024, 96, 64),
];

#[test]
fn every_kernel_matches_the_cpu_reference() -> Result<(), BackendError> {
    let Some(gpu) = cuda_or_skip("every_kernel_matches_the_cpu_reference") else {
        return Ok(());
    };
    // Fresh inputs every run; the seed is printed so a failure can be replayed.
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("every_kernel_matches_the_cpu_reference: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    for (m, k, n) in GEMM_SHAPES {
        let a = random(&mut rng, m * k);
        let b = random(&mut rng, k * n);
        let bias = random(&mut rng, n);
        let (a_gpu, b_gpu, bias_gpu) = (gpu.upload(&a)?, gpu.upload(&b)?, gpu.upload(&bias)?);
        let (a_abs, b_abs, bias_abs) = (absolute(&a), absolute(&b), absolute(&bias));
        let dims = GemmDims { m, k, n };
        type CpuGemm = fn(
            &[f32],
            &[f32],
            usize,
            usize,
            usize,
            Epilogue<'_, [f32]>,
        ) -> Result<Vec<f32>, OpError>;
        let forms: [(GemmForm, CpuGemm); 3] = [
            (GemmForm::Ab, cpu::gemm_ab),
            (GemmForm::Atb, cpu::gemm_atb),
            (GemmForm::Abt, cpu::gemm_abt),
        ];
        for (form, reference) in forms {
            for (with_bias, relu) in [(false, false), (true, false), (false, true), (true, true)] {
                let what = format!("{} {m}x{k}x{n} bias={with_bias} relu={relu}", form.op_name());
                let epilogue_gpu = Epilogue { bias: with_bias.then_some(&bias_gpu), relu };
                // Poison C so that a kernel skipping an element cannot pass on alloc's zeros.
                let mut c = gpu.upload(&vec![f32::NAN; m * n])?;
                match form {
                    GemmForm::Ab => gpu.gemm_ab(&a_gpu, &b_gpu, dims, epilogue_gpu, &mut c)?,
                    GemmForm::Atb => gpu.gemm_atb(&a_gpu, &b_gpu, dims, epilogue_gpu, &mut c)?,
                    GemmForm::Abt => gpu.gemm_abt(&a_gpu, &b_gpu, dims, epilogue_gpu, &mut c)?,
                }
                let expected = reference(
                    &a,
                    &b,
                    m,
                    k,
                    n,
                    Epilogue { bias: with_bias.then_some(&bias), relu },
                )?;
                // Both sides round each of k+1 additions: their gap is at most about
                // 2(k+1)u Σ|a||b| (+|bias|), where u is f32's unit roundoff. ReLU only shrinks
                // it. One wrong or missing term moves a result by ~|a||b|, far beyond this.
                let magnitude = reference(
                    &a_abs,
                    &b_abs,
                    m,
                    k,
                    n,
                    Epilogue { bias: with_bias.then_some(&bias_abs), relu: false },
                )?;
                let unit_roundoff = f32::EPSILON / 2.0;
                let tolerances: Vec<f32> = magnitude
                    .iter()
                    .map(|&s| 2.0 * (k + 2) as f32 * unit_roundoff * s + 1e-7)
                    .collect();
                assert_within(&gpu.download(&c)?, &expected, &tolerances, &what);
            }
        }
    }

    for (rows, cols) in [(1, 1), (7, 3), (33, 65), (1000, 2), (257, 300), (100_000, 3)] {
        let len = rows * cols;
        let x = random(&mut rng, len);
        let y = random(&mut rng, len);
        let (x_gpu, y_gpu) = (gpu.upload(&x)?, gpu.upload(&y)?);

        let mut out = gpu.upload(&vec![f32::NAN; len])?;
        gpu.relu_backward(&x_gpu, &y_gpu, &mut out)?;
        // Exact: the kernel only selects.
        assert_eq!(gpu.download(&out)?, cpu::relu_backward(&x, &y)?, "relu_backward {len}");

        let mut sums = gpu.upload(&vec![f32::NAN; cols])?;
        gpu.column_sums(&x_gpu, rows, cols, &mut sums)?;
        let expected = cpu::column_sums(&x, rows, cols)?;
        // The kernel adds in another order. Rounding errors of random sign grow like
        // sqrt(rows) u Σ|x|; in simulation the two orders stay under 4% of that.
        let magnitude = cpu::column_sums(&absolute(&x), rows, cols)?;
        let growth = (rows as f32).sqrt() * f32::EPSILON / 2.0;
        let tolerances: Vec<f32> = magnitude.iter().map(|&s| growth * s + 1e-7).collect();
        assert_within(
            &gpu.download(&sums)?,
            &expected,
            &tolerances,
            &format!("column_sums {rows}x{cols}"),
        );

        let mut grad = gpu.upload(&vec![f32::NAN; len])?;
        let loss = gpu.mse_loss_and_grad(&x_gpu, &y_gpu, &mut grad)?;
        let (expected_loss, expected_grad) = cpu::mse_loss_and_grad(&x, &y)?;
        assert_close(&[loss], &[expected_loss], 1e-5, &format!("mse loss {len}"));
        assert_close(&gpu.download(&grad)?, &expected_grad, 1e-6, &format!("mse grad {len}"));
    }

    let adam = AdamConfig { lr: 1e-2, ..AdamConfig::default() };
    for len in [1, 255, 256, 257, 10_000] {
        let mut param = random(&mut rng, len);
        let (mut m, mut v) = (vec![0.0; len], vec![0.0; len]);
        let mut param_gpu = gpu.upload(&param)?;
        let (mut m_gpu, mut v_gpu) = (gpu.zeros(len)?, gpu.zeros(len)?);
        for step in 1..=5 {
            let grad = random(&mut rng, len);
            let grad_gpu = gpu.upload(&grad)?;
            gpu.adam_update(&mut param_gpu, &grad_gpu, &mut m_gpu, &mut v_gpu, &adam, step)?;
            cpu::adam_update(&mut param, &grad, &mut m, &mut v, &adam, step)?;
        }
        assert_close(&gpu.download(&param_gpu)?, &param, 1e-5, &format!("adam param {len}"));
        assert_close(&gpu.download(&m_gpu)?, &m, 1e-5, &format!("adam m {len}"));
        assert_close(&gpu.download(&v_gpu)?, &v, 1e-5, &format!("adam v {len}"));
    }
    Ok(())
}

#[test]
fn gpu_rejects_bad_shapes_before_launching() -> Result<(), BackendError> {
    let Some(gpu) = cuda_or_skip("gpu_rejects_bad_shapes_before_launching") else {
        return Ok(());
    };
    let a = gpu.zeros(6)?;
    let b = gpu.zeros(6)?;
    let mut c = gpu.zeros(4)?;
    let result = gpu.gemm_ab(&a, &b, GemmDims { m: 2, k: 3, n: 3 }, Epilogue::none(), &mut c);
    assert!(matches!(result, Err(BackendError::Op(OpError::Length { operand: "B", .. }))));
    let mut out = gpu.zeros(5)?;
    assert!(gpu.relu_backward(&a, &b, &mut out).is_err());
    let mut v = gpu.zeros(6)?;
    let mut m = gpu.zeros(6)?;
    let mut p = gpu.zeros(6)?;
    let result = gpu.adam_update(&mut p, &a, &mut m, &mut v, &AdamConfig::default(), 0);
    assert!(matches!(result, Err(BackendError::Op(OpError::AdamStepZero))));
    Ok(())
}

#[test]
fn gpu_training_follows_the_cpu_loss_curve() -> Result<(), crate::train::TrainError> {
    let Some(gpu) = cuda_or_skip("gpu_training_follows_the_cpu_loss_curve") else {
        return Ok(());
    };
    let mlp = new_mlp(&MlpConfig { inputs: 3, hidden: vec![64, 64], outputs: 2, seed: 21 })?;
    let rows = 512;
    let mut rng = StdRng::seed_from_u64(17);
    let x: Vec<f32> = (0..rows * 3).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let y: Vec<f32> =
        x.chunks_exact(3).flat_map(|s| [s[0].sin() + s[1] * s[2], s[0] * s[0] - s[2]]).collect();
    let adam = AdamConfig { lr: 5e-3, ..AdamConfig::default() };
    let mut on_cpu = Trainer::new(&CpuBackend, &mlp, adam)?;
    let mut on_gpu = Trainer::new(&gpu, &mlp, adam)?;
    for step in 0..100 {
        let cpu_loss = on_cpu.train_step(&x, &y, rows)?;
        let gpu_loss = on_gpu.train_step(&x, &y, rows)?;
        // Rounding differences compound through the steps, so the bound is looser than a
        // single kernel's, and still far tighter than the loss's fall.
        assert!(
            (cpu_loss - gpu_loss).abs() <= 1e-2 * cpu_loss.abs() + 1e-6,
            "step {step}: CPU loss {cpu_loss} vs GPU loss {gpu_loss}"
        );
        if step % 20 == 0 {
            eprintln!("step {step:>3}: CPU loss {cpu_loss:.6}, GPU loss {gpu_loss:.6}");
        }
    }
    let cpu_model = on_cpu.to_mlp()?;
    let gpu_model = on_gpu.to_mlp()?;
    let (cpu_out, gpu_out) = (cpu_model.predict(&x, rows)?, gpu_model.predict(&x, rows)?);
    let (gap, _) = cpu::mse_loss_and_grad(&cpu_out, &gpu_out).map_err(BackendError::from)?;
    eprintln!("mean squared gap between CPU- and GPU-trained predictions: {gap:.3e}");
    assert!(gap < 1e-3, "the GPU-trained model predicts differently: {gap}");
    Ok(())
}
