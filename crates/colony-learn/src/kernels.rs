//! The CUDA C sources of the training kernels, their entry points and launch geometry, the
//! checked-in PTX, and a parser for ptxas resource reports.
//!
//! The sources are compiled as one NVRTC program. `kernels/ptx/colony_kernels.ptx` is that
//! program compiled for `compute_90` by NVRTC 13.0 (`gen-ptx.sh` regenerates it): the fallback
//! when a GPU machine has a driver but no libnvrtc. Nothing here calls into CUDA; see
//! [`crate::gpu`].

use cudarc::nvrtc::CompileOptions;

/// All kernel sources, concatenated into one translation unit. They include no headers.
pub const SOURCE: &str = concat!(
    include_str!("../kernels/gemm.cu"),
    "\n",
    include_str!("../kernels/elementwise.cu"),
    "\n",
    include_str!("../kernels/reduce.cu"),
);

/// The name NVRTC gives the program in its diagnostics.
pub const PROGRAM_NAME: &str = "colony_kernels.cu";

/// The checked-in PTX, compiled from [`SOURCE`] for [`CHECKED_IN_ARCH`].
pub const CHECKED_IN_PTX: &str = include_str!("../kernels/ptx/colony_kernels.ptx");
/// Where the checked-in PTX lives, relative to this crate's directory.
pub const CHECKED_IN_PTX_PATH: &str = "kernels/ptx/colony_kernels.ptx";
/// The virtual architecture of the checked-in PTX: Hopper, which the driver JIT-compiles for
/// newer GPUs too.
pub const CHECKED_IN_ARCH: &str = "compute_90";
/// The NVRTC release that generates the checked-in PTX. The H100 machines run a CUDA 13.0
/// driver, which refuses PTX from a newer NVRTC (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
pub const CHECKED_IN_NVRTC_VERSION: (i32, i32) = (13, 0);

pub const GEMM_AB: &str = "colony_gemm_ab";
pub const GEMM_ATB: &str = "colony_gemm_atb";
pub const GEMM_ABT: &str = "colony_gemm_abt";
pub const RELU_BACKWARD: &str = "colony_relu_backward";
pub const MSE_LOSS_GRAD: &str = "colony_mse_loss_grad";
pub const COLUMN_SUMS: &str = "colony_column_sums";
pub const ADAM_UPDATE: &str = "colony_adam_update";

/// Every `extern "C"` entry point in [`SOURCE`].
pub const ENTRY_POINTS: [&str; 7] =
    [GEMM_AB, GEMM_ATB, GEMM_ABT, RELU_BACKWARD, MSE_LOSS_GRAD, COLUMN_SUMS, ADAM_UPDATE];

// Launch geometry. Each value mirrors a `#define` in the sources, which a test checks.
/// `COLONY_TILE`: a GEMM block computes a GEMM_TILE x GEMM_TILE tile of C.
pub const GEMM_TILE: u32 = 32;
/// `COLONY_GEMM_BLOCK_ROWS`: a GEMM block is GEMM_TILE x GEMM_BLOCK_ROWS threads.
pub const GEMM_BLOCK_ROWS: u32 = 8;
/// `COLONY_GEMM_BIAS`: the GEMM flag that adds the bias.
pub const GEMM_FLAG_BIAS: i32 = 1;
/// `COLONY_GEMM_RELU`: the GEMM flag that applies the ReLU.
pub const GEMM_FLAG_RELU: i32 = 2;
/// `COLONY_REDUCE_THREADS`: the block size the MSE reduction tree is written for.
pub const REDUCE_THREADS: u32 = 256;
/// `COLONY_COLUMN_BLOCK_ROWS`: a column-sum block is 32 x COLUMN_BLOCK_ROWS threads.
pub const COLUMN_BLOCK_ROWS: u32 = 8;
/// `COLONY_ELEMENTWISE_THREADS`: threads per block of the element-wise kernels, which their
/// launch bounds promise.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// The most blocks the MSE kernel is launched with; beyond this blocks stride over the input,
/// which bounds the partial sums the host reads back.
pub const MSE_BLOCKS_MAX: u32 = 1024;

/// NVRTC options for PTX (or, with an `sm_` architecture and `extra` ptxas flags, a cubin).
/// The run-time compile, `gen_ptx` and the tests share them so their outputs agree.
pub fn compile_options(arch: &str, extra: &[&str]) -> CompileOptions {
    let mut options = vec![format!("--gpu-architecture={arch}")];
    options.extend(extra.iter().map(|option| option.to_string()));
    CompileOptions { options, name: Some(PROGRAM_NAME.to_string()), ..CompileOptions::default() }
}

/// One kernel's resources as ptxas reports them with `-v`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
}

/// Reads a `--ptxas-options=-v` log:
///
/// ```text
/// ptxas info    : Compiling entry function 'colony_gemm_ab' for 'sm_90'
/// ptxas info    : Function properties for colony_gemm_ab
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 40 registers, used 1 barriers, 8448 bytes smem, 400 bytes cmem[0]
/// ```
///
/// Returns one entry per function that has a "Used N registers" line, in log order.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut kernels = Vec::new();
    let mut current: Option<KernelResources> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            kernels.extend(current.take().filter(|kernel| kernel.registers > 0));
            current = Some(KernelResources {
                name: rest.trim().to_string(),
                registers: 0,
                stack_frame_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                shared_bytes: 0,
            });
        } else if let Some(kernel) = current.as_mut() {
            if line.contains("bytes stack frame") {
                kernel.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                kernel.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                kernel.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("registers") {
                kernel.registers = number_after(line, "Used ").unwrap_or(0);
                kernel.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    kernels.extend(current.filter(|kernel| kernel.registers > 0));
    kernels
}

/// The integer just before `marker` in `line`, as in "8448 bytes smem".
fn number_before(line: &str, marker: &str) -> Option<u32> {
    let head = &line[..line.find(marker)?];
    head.split(|c: char| !c.is_ascii_digit()).rfind(|part| !part.is_empty())?.parse().ok()
}

/// The integer just after `marker` in `line`, as in "Used 40 registers".
fn number_after(line: &str, marker: &str) -> Option<u32> {
    let tail = &line[line.find(marker)? + marker.len()..];
    tail.split(|c: char| !c.is_ascii_digit()).find(|part| !part.is_empty())?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Always runs, with or without NVRTC: the PTX a GPU machine falls back to is present on
    /// disk, is what the crate embeds, and declares every kernel.
    #[test]
    fn checked_in_ptx_exists_and_declares_every_entry_point() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CHECKED_IN_PTX_PATH);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()));
        assert!(!on_disk.trim().is_empty(), "{} is empty", path.display());
        assert_eq!(on_disk, CHECKED_IN_PTX, "the embedded PTX is stale; rebuild");
        assert!(on_disk.contains(".target sm_90"), "the PTX is not for compute_90");
        for name in ENTRY_POINTS {
            assert!(
                on_disk.contains(&format!(".entry {name}(")),
                "the checked-in PTX does not declare {name}"
            );
            assert!(SOURCE.contains(&format!("\n{name}(")), "the sources do not define {name}");
        }
        assert_eq!(SOURCE.matches("extern \"C\" __global__").count(), ENTRY_POINTS.len());
    }

    #[test]
    fn launch_constants_match_the_sources() {
        let defines = [
            ("COLONY_TILE", i64::from(GEMM_TILE)),
            ("COLONY_GEMM_BLOCK_ROWS", i64::from(GEMM_BLOCK_ROWS)),
            ("COLONY_GEMM_BIAS", i64::from(GEMM_FLAG_BIAS)),
            ("COLONY_GEMM_RELU", i64::from(GEMM_FLAG_RELU)),
            ("COLONY_REDUCE_THREADS", i64::from(REDUCE_THREADS)),
            ("COLONY_COLUMN_BLOCK_ROWS", i64::from(COLUMN_BLOCK_ROWS)),
            ("COLONY_ELEMENTWISE_THREADS", i64::from(ELEMENTWISE_THREADS)),
        ];
        for (name, value) in defines {
            let line = format!("#define {name} {value}\n");
            assert!(SOURCE.contains(&line), "the sources lack `{}`", line.trim());
        }
        assert!(!SOURCE.contains("#include"), "the kernels must not include headers");
    }

    #[test]
    fn parses_a_ptxas_report() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'colony_gemm_ab' for 'sm_90'
ptxas info    : Function properties for colony_gemm_ab
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8448 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'colony_adam_update' for 'sm_90'
ptxas info    : Function properties for colony_adam_update
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, 420 bytes cmem[0]
";
        let kernels = parse_ptxas_log(log);
        assert_eq!(
            kernels,
            vec![
                KernelResources {
                    name: "colony_gemm_ab".into(),
                    registers: 40,
                    stack_frame_bytes: 0,
                    spill_store_bytes: 0,
                    spill_load_bytes: 0,
                    shared_bytes: 8448,
                },
                KernelResources {
                    name: "colony_adam_update".into(),
                    registers: 255,
                    stack_frame_bytes: 8,
                    spill_store_bytes: 4,
                    spill_load_bytes: 12,
                    shared_bytes: 0,
                },
            ]
        );
    }
}
