//! The CUDA backend: the training primitives as the hand-written kernels in `kernels/*.cu`,
//! launched through cudarc, plus the NVRTC helpers that compile them.
//!
//! This is the crate's only module with `unsafe`: probing for the CUDA libraries, kernel
//! launches and the raw NVRTC calls that return ptxas's log. Every launch is preceded by the same
//! shape checks as the CPU reference, plus checks that the sizes fit the kernels' `int` indices
//! and the grid limits, so a kernel never reads or writes outside the buffers it is given.
//!
//! cudarc panics, instead of returning an error, when its shared library cannot be loaded, so
//! every entry point here first probes with `is_culib_present` (which only tries `dlopen`).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileError, Ptx};
use thiserror::Error;
use tracing::{info, warn};

use crate::adam::AdamConfig;
use crate::backend::{
    check_adam, check_gemm, check_len, product, Backend, BackendError, Epilogue, GemmDims,
    GemmForm, OpError,
};
use crate::cpu::mse_grad_scale;
use crate::kernels;

/// The largest grid height CUDA allows; GEMMs tile rows along y.
const GRID_Y_BLOCKS_MAX: usize = 65_535;
/// The largest element count a kernel indexes: the kernels use `int` sizes and offsets.
const KERNEL_ELEMENTS_MAX: usize = i32::MAX as usize;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error("the CUDA driver library (libcuda) was not found")]
    NoDriver,
    #[error("CUDA device {index} does not exist ({count} found)")]
    NoDevice { index: usize, count: usize },
    #[error("the CUDA driver failed while {during}")]
    Driver {
        during: &'static str,
        #[source]
        source: DriverError,
    },
    #[error("libcuda panicked while opening device {index}; is the driver older than CUDA 13.0?")]
    DriverPanicked { index: usize },
    #[error("the NVRTC library (libnvrtc) was not found")]
    NoNvrtc,
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("{op}: {what} = {value} exceeds the kernel's limit of {max}")]
    TooLarge { op: &'static str, what: &'static str, value: usize, max: usize },
    #[error("the cuBLAS library (libcublas) was not found")]
    NoCublas,
    #[error("cuBLAS failed while {during}")]
    Cublas {
        during: &'static str,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
}

/// GFLOP/s of row-major C = A·B through cuBLAS's SGEMM on `backend`'s stream, averaged over `reps`
/// runs after one warm-up run: the yardstick `colony bench learn` prints beside our own GEMM.
pub fn cublas_gemm_gflops(
    backend: &CudaBackend,
    m: usize,
    k: usize,
    n: usize,
    reps: usize,
) -> Result<f64, GpuError> {
    // SAFETY: `is_culib_present` only attempts `dlopen`; see `driver_available`.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(GpuError::NoCublas);
    }
    let dim = |what: &'static str, value: usize| {
        i32::try_from(value).map_err(|_| GpuError::TooLarge {
            op: "cublas gemm",
            what,
            value,
            max: i32::MAX as usize,
        })
    };
    let (mi, ki, ni) = (dim("m", m)?, dim("k", k)?, dim("n", n)?);
    let stream = &backend.stream;
    let blas = cudarc::cublas::CudaBlas::new(stream.clone())
        .map_err(|source| GpuError::Cublas { during: "creating a handle", source })?;
    let a = stream.clone_htod(&vec![0.5f32; m * k]).map_err(driver_error("uploading A"))?;
    let b = stream.clone_htod(&vec![0.25f32; k * n]).map_err(driver_error("uploading B"))?;
    let mut c = stream.alloc_zeros::<f32>(m * n).map_err(driver_error("allocating C"))?;
    // cuBLAS is column-major: row-major C (m x n) = A·B is column-major Cᵀ (n x m) = Bᵀ·Aᵀ, where
    // B's row-major buffer is Bᵀ column-major (n x k) and A's is Aᵀ (k x m).
    let config = cudarc::cublas::GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: ni,
        n: mi,
        k: ki,
        alpha: 1.0f32,
        lda: ni,
        ldb: ki,
        beta: 0.0f32,
        ldc: ni,
    };
    let mut run = || {
        use cudarc::cublas::Gemm as _;
        // SAFETY: A holds m*k, B k*n and C m*n floats, exactly what the leading dimensions and
        // sizes above describe, so SGEMM reads and writes inside the three buffers.
        unsafe { blas.gemm(config, &b, &a, &mut c) }
            .map_err(|source| GpuError::Cublas { during: "running SGEMM", source })
    };
    run()?;
    stream.synchronize().map_err(driver_error("synchronizing"))?;
    let started = std::time::Instant::now();
    for _ in 0..reps.max(1) {
        run()?;
    }
    stream.synchronize().map_err(driver_error("synchronizing"))?;
    let flops = 2.0 * m as f64 * k as f64 * n as f64 * reps.max(1) as f64;
    Ok(flops / started.elapsed().as_secs_f64() / 1e9)
}

/// Whether the CUDA driver library can be loaded. Never panics.
pub fn driver_available() -> bool {
    // SAFETY: `is_culib_present` only attempts `dlopen` on the candidate library names and drops
    // the handle; it has no preconditions. Loading runs the library's initialisers, which is
    // inherent to using CUDA at all.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded. Never panics.
pub fn nvrtc_available() -> bool {
    // SAFETY: as in `driver_available`: a `dlopen` probe with no preconditions.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The loadable NVRTC's (major, minor) version, or `None` without one.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (probed above), and both pointers are to live locals that
    // nvrtcVersion only writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().ok().map(|()| (major, minor))
}

/// Compiles [`kernels::SOURCE`] to PTX for a virtual architecture such as `compute_90`.
pub fn compile_ptx(arch: &str) -> Result<String, GpuError> {
    if !nvrtc_available() {
        return Err(GpuError::NoNvrtc);
    }
    let ptx =
        cudarc::nvrtc::compile_ptx_with_opts(kernels::SOURCE, kernels::compile_options(arch, &[]))
            .map_err(|error| GpuError::Compile {
                arch: arch.to_string(),
                log: compile_log(&error),
            })?;
    let bytes = ptx.as_bytes().ok_or_else(|| GpuError::Compile {
        arch: arch.to_string(),
        log: "NVRTC returned no PTX image".to_string(),
    })?;
    // NVRTC's PTX is NUL-terminated ASCII.
    let text = bytes.split(|&byte| byte == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec()).map_err(|_| GpuError::Compile {
        arch: arch.to_string(),
        log: "NVRTC's PTX is not UTF-8".to_string(),
    })
}

fn compile_log(error: &CompileError) -> String {
    match error {
        CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => other.to_string(),
    }
}

/// Compiles [`kernels::SOURCE`] to a cubin for a real architecture such as `sm_90` with
/// `--ptxas-options=-v` and returns the compiler's log, which reports every kernel's registers,
/// shared memory and spills (read it with [`kernels::parse_ptxas_log`]).
pub fn ptxas_report(arch: &str) -> Result<String, GpuError> {
    use cudarc::nvrtc::result;
    if !nvrtc_available() {
        return Err(GpuError::NoNvrtc);
    }
    let compile_error = |log: String| GpuError::Compile { arch: arch.to_string(), log };
    // Neither string contains NUL; these conversions cannot fail, but stay errors, not panics.
    let source =
        CString::new(kernels::SOURCE).map_err(|_| compile_error("NUL in source".into()))?;
    let name =
        CString::new(kernels::PROGRAM_NAME).map_err(|_| compile_error("NUL in name".into()))?;
    let program = result::create_program(&source, Some(&name))
        .map_err(|error| compile_error(format!("nvrtcCreateProgram: {error}")))?;
    let options = kernels::compile_options(arch, &["--ptxas-options=-v"]).options;
    // SAFETY (this block and the two below): `program` was created just above from `source` and
    // `name`, which outlive it, and is destroyed only by the last call; the option strings
    // contain no NUL.
    let compiled = unsafe { result::compile_program(program, &options) };
    // SAFETY: see above.
    let log = unsafe { result::get_program_log(program) };
    // SAFETY: see above; `program` is not used after this.
    let destroyed = unsafe { result::destroy_program(program) };
    let log = log.map_err(|error| compile_error(format!("nvrtcGetProgramLog: {error}")))?;
    let log_bytes: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    let log = String::from_utf8_lossy(&log_bytes).into_owned();
    compiled.map_err(|_| compile_error(log.clone()))?;
    destroyed.map_err(|error| compile_error(format!("nvrtcDestroyProgram: {error}")))?;
    Ok(log)
}

/// Where the loaded kernels came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelOrigin {
    /// Compiled at start-up by the local NVRTC for the device's own architecture.
    Nvrtc { arch: String },
    /// The checked-in `compute_90` PTX.
    CheckedInPtx,
}

struct Kernels {
    gemm_ab: CudaFunction,
    gemm_atb: CudaFunction,
    gemm_abt: CudaFunction,
    relu_backward: CudaFunction,
    mse_loss_grad: CudaFunction,
    column_sums: CudaFunction,
    adam_update: CudaFunction,
}

impl Kernels {
    fn load(module: &Arc<CudaModule>) -> Result<Self, GpuError> {
        let load = |name: &'static str| {
            module
                .load_function(name)
                .map_err(|source| GpuError::Driver { during: "looking up a kernel", source })
        };
        Ok(Self {
            gemm_ab: load(kernels::GEMM_AB)?,
            gemm_atb: load(kernels::GEMM_ATB)?,
            gemm_abt: load(kernels::GEMM_ABT)?,
            relu_backward: load(kernels::RELU_BACKWARD)?,
            mse_loss_grad: load(kernels::MSE_LOSS_GRAD)?,
            column_sums: load(kernels::COLUMN_SUMS)?,
            adam_update: load(kernels::ADAM_UPDATE)?,
        })
    }
}

/// Runs the training primitives on one CUDA device, in one stream.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Kernels,
    /// Passed as the bias of a GEMM without one: the kernel never reads it then, but the
    /// argument must still be a valid device pointer.
    no_bias: CudaSlice<f32>,
    device_index: usize,
    device_name: String,
    compute_capability: (i32, i32),
    origin: KernelOrigin,
}

fn driver_error(during: &'static str) -> impl FnOnce(DriverError) -> GpuError {
    move |source| GpuError::Driver { during, source }
}

fn gpu_error(during: &'static str) -> impl FnOnce(DriverError) -> BackendError {
    move |source| BackendError::Gpu(GpuError::Driver { during, source })
}

impl CudaBackend {
    /// Opens device `device_index`: probes for libcuda, creates the context and a stream, and
    /// loads the kernels (compiled now by NVRTC when it is present, else the checked-in PTX).
    pub fn new(device_index: usize) -> Result<Self, GpuError> {
        if !driver_available() {
            return Err(GpuError::NoDriver);
        }
        // cudarc also panics when a driver lacks a symbol it expects (a driver older than the
        // CUDA 13.0 API it is built against). Keep that an error, so `auto` can use the CPU.
        std::panic::catch_unwind(|| Self::open(device_index))
            .unwrap_or(Err(GpuError::DriverPanicked { index: device_index }))
    }

    fn open(index: usize) -> Result<Self, GpuError> {
        let count = match CudaContext::device_count() {
            Ok(count) => usize::try_from(count).unwrap_or(0),
            // cuInit reports a machine with a driver but no GPU as an error, not as zero devices.
            Err(DriverError(cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE)) => 0,
            Err(source) => return Err(GpuError::Driver { during: "counting devices", source }),
        };
        if index >= count {
            return Err(GpuError::NoDevice { index, count });
        }
        let context = CudaContext::new(index).map_err(driver_error("creating a context"))?;
        let compute_capability =
            context.compute_capability().map_err(driver_error("reading the compute capability"))?;
        let device_name = context.name().map_err(driver_error("reading the device name"))?;
        let stream = context.new_stream().map_err(driver_error("creating a stream"))?;
        let (module, origin) = load_module(&context, compute_capability)?;
        let kernels = Kernels::load(&module)?;
        let no_bias = stream.alloc_zeros::<f32>(1).map_err(driver_error("allocating"))?;
        info!(
            device = index,
            name = %device_name,
            compute_capability = ?compute_capability,
            kernels = ?origin,
            "opened CUDA device"
        );
        Ok(Self {
            stream,
            kernels,
            no_bias,
            device_index: index,
            device_name,
            compute_capability,
            origin,
        })
    }

    pub fn device_index(&self) -> usize {
        self.device_index
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn kernel_origin(&self) -> &KernelOrigin {
        &self.origin
    }

    fn gemm(
        &self,
        form: GemmForm,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, CudaSlice<f32>>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        let op = form.op_name();
        let lens = check_gemm(
            form,
            dims,
            a.len(),
            b.len(),
            epilogue.bias.map(CudaSlice::len),
            Some(c.len()),
        )?;
        for (what, value) in [("m*k", lens.a), ("k*n", lens.b), ("m*n", lens.c)] {
            kernel_int(op, what, value)?;
        }
        if dims.m == 0 || dims.n == 0 {
            return Ok(());
        }
        let tile = kernels::GEMM_TILE as usize;
        let grid_y = dims.m.div_ceil(tile);
        if grid_y > GRID_Y_BLOCKS_MAX {
            return Err(too_large(op, "m / tile", grid_y, GRID_Y_BLOCKS_MAX));
        }
        let config = LaunchConfig {
            grid_dim: (grid_u32(op, dims.n.div_ceil(tile))?, grid_u32(op, grid_y)?, 1),
            block_dim: (kernels::GEMM_TILE, kernels::GEMM_BLOCK_ROWS, 1),
            shared_mem_bytes: 0,
        };
        let mut flags = 0_i32;
        if epilogue.bias.is_some() {
            flags |= kernels::GEMM_FLAG_BIAS;
        }
        if epilogue.relu {
            flags |= kernels::GEMM_FLAG_RELU;
        }
        let bias = epilogue.bias.unwrap_or(&self.no_bias);
        let (m, k, n) = (
            kernel_int(op, "m", dims.m)?,
            kernel_int(op, "k", dims.k)?,
            kernel_int(op, "n", dims.n)?,
        );
        let function = match form {
            GemmForm::Ab => &self.kernels.gemm_ab,
            GemmForm::Atb => &self.kernels.gemm_atb,
            GemmForm::Abt => &self.kernels.gemm_abt,
        };
        let mut launch = self.stream.launch_builder(function);
        launch.arg(a).arg(b).arg(bias).arg(c).arg(&m).arg(&k).arg(&n).arg(&flags);
        // SAFETY: the arguments match the kernel's signature (const float* a, b, bias;
        // float* c; int m, k, n, flags). check_gemm proved a, b and c hold exactly m*k, k*n and
        // m*n floats and the bias (when flagged) n; the kernel reads bias only when flagged,
        // and `no_bias` is a valid one-float buffer otherwise. Every load and store in the kernel
        // is guarded by row < m, col < n, kk < k, and all products fit in int (checked above),
        // so no access leaves the buffers. `c` is borrowed mutably, so it aliases no input.
        unsafe { launch.launch(config) }.map_err(gpu_error("launching a GEMM"))?;
        Ok(())
    }
}

/// Loads the kernels: NVRTC's build for this device when possible (it may be newer than the
/// checked-in PTX, or the device older than compute_90), otherwise the checked-in PTX.
fn load_module(
    context: &Arc<CudaContext>,
    (major, minor): (i32, i32),
) -> Result<(Arc<CudaModule>, KernelOrigin), GpuError> {
    if nvrtc_available() {
        let arch = format!("compute_{major}{minor}");
        match compile_ptx(&arch) {
            Ok(ptx) => match context.load_module(Ptx::from_src(ptx)) {
                Ok(module) => return Ok((module, KernelOrigin::Nvrtc { arch })),
                // Typically CUDA_ERROR_UNSUPPORTED_PTX_VERSION: NVRTC newer than the driver.
                Err(error) => {
                    warn!(%arch, %error, "the driver refused NVRTC's PTX; using the checked-in PTX")
                }
            },
            Err(error) => warn!(%arch, %error, "NVRTC failed; using the checked-in PTX"),
        }
    } else {
        info!("libnvrtc not found; using the checked-in compute_90 PTX");
    }
    let module =
        context.load_module(Ptx::from_src(kernels::CHECKED_IN_PTX)).map_err(driver_error(
            "loading the checked-in compute_90 PTX (needs compute capability 9.0+ or libnvrtc)",
        ))?;
    Ok((module, KernelOrigin::CheckedInPtx))
}

fn too_large(op: &'static str, what: &'static str, value: usize, max: usize) -> BackendError {
    BackendError::Gpu(GpuError::TooLarge { op, what, value, max })
}

/// `value` as a kernel `int`, or an error if it does not fit.
fn kernel_int(op: &'static str, what: &'static str, value: usize) -> Result<i32, BackendError> {
    i32::try_from(value).map_err(|_| too_large(op, what, value, KERNEL_ELEMENTS_MAX))
}

fn grid_u32(op: &'static str, blocks: usize) -> Result<u32, BackendError> {
    u32::try_from(blocks).map_err(|_| too_large(op, "blocks", blocks, u32::MAX as usize))
}

/// One thread per element, ELEMENTWISE_THREADS per block.
fn elementwise_config(op: &'static str, len: usize) -> Result<LaunchConfig, BackendError> {
    Ok(LaunchConfig {
        grid_dim: (grid_u32(op, len.div_ceil(kernels::ELEMENTWISE_THREADS as usize))?, 1, 1),
        block_dim: (kernels::ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Backend for CudaBackend {
    type Buffer = CudaSlice<f32>;

    fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("cuda:{} ({}, sm_{major}{minor})", self.device_index, self.device_name)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>, BackendError> {
        self.stream.clone_htod(host).map_err(gpu_error("copying to the device"))
    }

    fn write(&self, host: &[f32], buffer: &mut CudaSlice<f32>) -> Result<(), BackendError> {
        // cudarc asserts dst >= src; an exact match is checked here so that it never fires.
        check_len("write", "buffer", host.len(), buffer.len())?;
        self.stream.memcpy_htod(host, buffer).map_err(gpu_error("copying to the device"))
    }

    fn download(&self, buffer: &CudaSlice<f32>) -> Result<Vec<f32>, BackendError> {
        self.stream.clone_dtoh(buffer).map_err(gpu_error("copying from the device"))
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, BackendError> {
        self.stream.alloc_zeros::<f32>(len).map_err(gpu_error("allocating"))
    }

    fn gemm_ab(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, CudaSlice<f32>>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        self.gemm(GemmForm::Ab, a, b, dims, epilogue, c)
    }

    fn gemm_atb(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, CudaSlice<f32>>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        self.gemm(GemmForm::Atb, a, b, dims, epilogue, c)
    }

    fn gemm_abt(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        dims: GemmDims,
        epilogue: Epilogue<'_, CudaSlice<f32>>,
        c: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        self.gemm(GemmForm::Abt, a, b, dims, epilogue, c)
    }

    fn relu_backward(
        &self,
        grad: &CudaSlice<f32>,
        activation: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        const OP: &str = "relu_backward";
        check_len(OP, "activation", grad.len(), activation.len())?;
        check_len(OP, "output", grad.len(), out.len())?;
        if grad.is_empty() {
            return Ok(());
        }
        let len = kernel_int(OP, "len", grad.len())?;
        let config = elementwise_config(OP, grad.len())?;
        let mut launch = self.stream.launch_builder(&self.kernels.relu_backward);
        launch.arg(grad).arg(activation).arg(out).arg(&len);
        // SAFETY: arguments match (const float* grad, activation; float* out; int len); all
        // three buffers hold exactly len floats (checked above) and the kernel touches index i
        // only when i < len. `out` is borrowed mutably, so it aliases neither input.
        unsafe { launch.launch(config) }.map_err(gpu_error("launching relu_backward"))?;
        Ok(())
    }

    fn mse_loss_and_grad(
        &self,
        pred: &CudaSlice<f32>,
        target: &CudaSlice<f32>,
        grad: &mut CudaSlice<f32>,
    ) -> Result<f32, BackendError> {
        const OP: &str = "mse_loss_and_grad";
        check_len(OP, "target", pred.len(), target.len())?;
        check_len(OP, "grad", pred.len(), grad.len())?;
        if pred.is_empty() {
            return Err(OpError::Empty { op: OP }.into());
        }
        let len = kernel_int(OP, "len", pred.len())?;
        let threads = kernels::REDUCE_THREADS as usize;
        let blocks = pred.len().div_ceil(threads).min(kernels::MSE_BLOCKS_MAX as usize);
        let mut partial_sums =
            self.stream.alloc_zeros::<f32>(blocks).map_err(gpu_error("allocating"))?;
        let scale = mse_grad_scale(pred.len());
        let config = LaunchConfig {
            grid_dim: (grid_u32(OP, blocks)?, 1, 1),
            block_dim: (kernels::REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.kernels.mse_loss_grad);
        launch.arg(pred).arg(target).arg(grad).arg(&mut partial_sums).arg(&len).arg(&scale);
        // SAFETY: arguments match (const float* pred, target; float* grad, partial_sums;
        // int len; float grad_scale). pred, target and grad hold exactly len floats; the kernel
        // strides i < len. partial_sums holds `blocks` floats and block b writes only
        // partial_sums[b] for b < gridDim.x = blocks. The block size is REDUCE_THREADS, the size
        // the kernel's shared array and reduction tree are written for.
        unsafe { launch.launch(config) }.map_err(gpu_error("launching mse_loss_grad"))?;
        let partial_sums =
            self.stream.clone_dtoh(&partial_sums).map_err(gpu_error("copying from the device"))?;
        let sum: f64 = partial_sums.iter().map(|&partial| f64::from(partial)).sum();
        Ok((sum / pred.len() as f64) as f32)
    }

    fn column_sums(
        &self,
        a: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), BackendError> {
        const OP: &str = "column_sums";
        let elements = product(OP, rows, cols)?;
        check_len(OP, "a", elements, a.len())?;
        check_len(OP, "output", cols, out.len())?;
        kernel_int(OP, "rows*cols", elements)?;
        if cols == 0 {
            return Ok(());
        }
        let (rows_i, cols_i) = (kernel_int(OP, "rows", rows)?, kernel_int(OP, "cols", cols)?);
        let config = LaunchConfig {
            grid_dim: (grid_u32(OP, cols.div_ceil(32))?, 1, 1),
            block_dim: (32, kernels::COLUMN_BLOCK_ROWS, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.kernels.column_sums);
        launch.arg(a).arg(out).arg(&rows_i).arg(&cols_i);
        // SAFETY: arguments match (const float* a; float* out; int rows, cols). `a` holds
        // exactly rows*cols floats and `out` cols; the kernel reads a[row*cols + col] only for
        // row < rows and col < cols, and writes out[col] only for col < cols. The block shape is
        // the 32 x COLUMN_BLOCK_ROWS its shared array is sized for.
        unsafe { launch.launch(config) }.map_err(gpu_error("launching column_sums"))?;
        Ok(())
    }

    fn adam_update(
        &self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        adam: &AdamConfig,
        step: u64,
    ) -> Result<(), BackendError> {
        const OP: &str = "adam_update";
        check_adam(param.len(), grad.len(), m.len(), v.len(), step)?;
        if param.is_empty() {
            return Ok(());
        }
        let len = kernel_int(OP, "len", param.len())?;
        let (bias_correction1, bias_correction2) = adam.bias_corrections(step);
        let config = elementwise_config(OP, param.len())?;
        let mut launch = self.stream.launch_builder(&self.kernels.adam_update);
        launch
            .arg(param)
            .arg(grad)
            .arg(m)
            .arg(v)
            .arg(&len)
            .arg(&adam.lr)
            .arg(&adam.beta1)
            .arg(&adam.beta2)
            .arg(&adam.eps)
            .arg(&bias_correction1)
            .arg(&bias_correction2);
        // SAFETY: arguments match (float* param; const float* grad; float* m, v; int len;
        // float lr, beta1, beta2, eps, bias_correction1, bias_correction2). All four buffers
        // hold exactly len floats (check_adam) and the kernel touches index i only when
        // i < len. param, m and v are distinct mutable borrows, so nothing aliases.
        unsafe { launch.launch(config) }.map_err(gpu_error("launching adam_update"))?;
        Ok(())
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        self.stream.synchronize().map_err(gpu_error("synchronizing"))
    }
}

#[cfg(test)]
pub(crate) mod tests;
