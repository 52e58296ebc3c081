//! Regenerates the checked-in PTX (`kernels/ptx/colony_kernels.ptx`) from `kernels/*.cu` with
//! NVRTC 13.0 for compute_90. Run through `gen-ptx.sh`, which finds or installs that NVRTC.
//! An optional argument writes somewhere else.

use std::path::PathBuf;
use std::process::ExitCode;

use colony_learn::gpu;
use colony_learn::kernels::{CHECKED_IN_ARCH, CHECKED_IN_NVRTC_VERSION, CHECKED_IN_PTX_PATH};

fn main() -> ExitCode {
    let path = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(CHECKED_IN_PTX_PATH),
        PathBuf::from,
    );
    // The PTX must come from the NVRTC matching the GPU machines' driver: newer PTX does not load.
    match gpu::nvrtc_version() {
        None => {
            eprintln!(
                "gen_ptx: libnvrtc not found; put NVRTC 13.0's lib directory on LD_LIBRARY_PATH"
            );
            return ExitCode::FAILURE;
        }
        Some(version) if version != CHECKED_IN_NVRTC_VERSION => {
            eprintln!("gen_ptx: found NVRTC {version:?}, need {CHECKED_IN_NVRTC_VERSION:?}");
            return ExitCode::FAILURE;
        }
        Some(_) => {}
    }
    let ptx = match gpu::compile_ptx(CHECKED_IN_ARCH) {
        Ok(ptx) => ptx,
        Err(error) => {
            eprintln!("gen_ptx: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = std::fs::write(&path, ptx) {
        eprintln!("gen_ptx: writing {}: {error}", path.display());
        return ExitCode::FAILURE;
    }
    println!("gen_ptx: wrote {}", path.display());
    ExitCode::SUCCESS
}
