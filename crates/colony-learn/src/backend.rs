//! The primitive operations training is built from, and the shape rules every backend enforces
//! before it touches memory.

use thiserror::Error;

use crate::adam::AdamConfig;
use crate::gpu::GpuError;

/// The sizes of one matrix product C (m x n) = op(A) · op(B), with k the shared dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Which operand a GEMM reads transposed. Each form is one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmForm {
    /// C = A·B: A is m x k, B is k x n.
    Ab,
    /// C = Aᵀ·B: A is stored k x m, B is k x n.
    Atb,
    /// C = A·Bᵀ: A is m x k, B is stored n x k.
    Abt,
}

impl GemmForm {
    pub fn op_name(self) -> &'static str {
        match self {
            GemmForm::Ab => "gemm_ab",
            GemmForm::Atb => "gemm_atb",
            GemmForm::Abt => "gemm_abt",
        }
    }
}

/// What is fused onto a GEMM's output: a bias added to every row (one value per output column),
/// then optionally a ReLU. `T` is the backend's buffer type.
#[derive(Debug)]
pub struct Epilogue<'a, T: ?Sized> {
    pub bias: Option<&'a T>,
    pub relu: bool,
}

// Derived Clone/Copy would require `T: Copy`, which a buffer never is; the struct only holds a
// shared reference, so copying it is always fine.
impl<T: ?Sized> Clone for Epilogue<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Epilogue<'_, T> {}

impl<T: ?Sized> Epilogue<'_, T> {
    /// A plain product.
    pub fn none() -> Self {
        Self { bias: None, relu: false }
    }
}

/// A caller's mistake in a primitive's arguments. Backends return it before launching anything.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OpError {
    #[error("{op}: {operand} holds {actual} values, expected {expected}")]
    Length { op: &'static str, operand: &'static str, expected: usize, actual: usize },
    #[error("{op}: the dimensions' product overflows")]
    Overflow { op: &'static str },
    #[error("{op}: the input is empty")]
    Empty { op: &'static str },
    #[error("adam_update: steps are counted from 1")]
    AdamStepZero,
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("invalid arguments to a primitive")]
    Op(#[from] OpError),
    #[error("the GPU failed")]
    Gpu(#[from] GpuError),
}

/// The primitives of training. Buffers are the backend's own (host vectors, device slices) so
/// that a training step moves no data between host and device except its inputs and the loss.
/// Every method checks its buffers' lengths against the dimensions first and returns
/// [`OpError`] on a mismatch.
pub trait Backend {
    type Buffer;

    /// A short description for logs and benchmarks, e.g. `cpu` or `cuda:0 (NVIDIA H100)`.
    fn describe(&self) -> String;
    fn upload(&self, host: &[f32]) -> Result<Self::Buffer, BackendError>;
    /// Overwrites `buffer`, which must hold exactly `host.len()` values.
    fn write(&self, host: &[f32], buffer: &mut Self::Buffer) -> Result<(), BackendError>;
    fn download(&self, buffer: &Self::Buffer) -> Result<Vec<f32>, BackendError>;
    fn zeros(&self, len: usize) -> Result<Self::Buffer, BackendError>;

    /// C = A·B (+ bias) (ReLU).
    fn gemm_ab(
        &self,
        a: &Self::Buffer,
        b: &Self::Buffer,
        dims: GemmDims,
        epilogue: Epilogue<'_, Self::Buffer>,
        c: &mut Self::Buffer,
    ) -> Result<(), BackendError>;
    /// C = Aᵀ·B (+ bias) (ReLU), A stored k x m.
    fn gemm_atb(
        &self,
        a: &Self::Buffer,
        b: &Self::Buffer,
        dims: GemmDims,
        epilogue: Epilogue<'_, Self::Buffer>,
        c: &mut Self::Buffer,
    ) -> Result<(), BackendError>;
    /// C = A·Bᵀ (+ bias) (ReLU), B stored n x k.
    fn gemm_abt(
        &self,
        a: &Self::Buffer,
        b: &Self::Buffer,
        dims: GemmDims,
        epilogue: Epilogue<'_, Self::Buffer>,
        c: &mut Self::Buffer,
    ) -> Result<(), BackendError>;
    /// out = grad where activation > 0, else 0.
    fn relu_backward(
        &self,
        grad: &Self::Buffer,
        activation: &Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<(), BackendError>;
    /// Returns the mean squared error over every element and writes its gradient.
    fn mse_loss_and_grad(
        &self,
        pred: &Self::Buffer,
        target: &Self::Buffer,
        grad: &mut Self::Buffer,
    ) -> Result<f32, BackendError>;
    /// out[c] = Σ_r a[r][c] for a rows x cols matrix.
    fn column_sums(
        &self,
        a: &Self::Buffer,
        rows: usize,
        cols: usize,
        out: &mut Self::Buffer,
    ) -> Result<(), BackendError>;
    /// One Adam step on `param`, updating the moments `m` and `v`; `step` counts from 1.
    fn adam_update(
        &self,
        param: &mut Self::Buffer,
        grad: &Self::Buffer,
        m: &mut Self::Buffer,
        v: &mut Self::Buffer,
        adam: &AdamConfig,
        step: u64,
    ) -> Result<(), BackendError>;
    /// Waits for queued work, so that timings include it.
    fn synchronize(&self) -> Result<(), BackendError>;
}

pub(crate) fn check_len(
    op: &'static str,
    operand: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), OpError> {
    if expected == actual {
        Ok(())
    } else {
        Err(OpError::Length { op, operand, expected, actual })
    }
}

pub(crate) fn product(op: &'static str, x: usize, y: usize) -> Result<usize, OpError> {
    x.checked_mul(y).ok_or(OpError::Overflow { op })
}

/// The element counts of A, B and C for a GEMM of this form.
pub(crate) struct GemmLens {
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

/// Checks every operand of a GEMM against its dimensions and returns the element counts; `c_len`
/// is `None` when the caller allocates C itself.
pub(crate) fn check_gemm(
    form: GemmForm,
    dims: GemmDims,
    a_len: usize,
    b_len: usize,
    bias_len: Option<usize>,
    c_len: Option<usize>,
) -> Result<GemmLens, OpError> {
    let op = form.op_name();
    // Aᵀ stored k x m has as many elements as A stored m x k; likewise for B.
    let lens = GemmLens {
        a: product(op, dims.m, dims.k)?,
        b: product(op, dims.k, dims.n)?,
        c: product(op, dims.m, dims.n)?,
    };
    check_len(op, "A", lens.a, a_len)?;
    check_len(op, "B", lens.b, b_len)?;
    if let Some(bias_len) = bias_len {
        check_len(op, "bias", dims.n, bias_len)?;
    }
    if let Some(c_len) = c_len {
        check_len(op, "C", lens.c, c_len)?;
    }
    Ok(lens)
}

pub(crate) fn check_adam(
    param: usize,
    grad: usize,
    m: usize,
    v: usize,
    step: u64,
) -> Result<(), OpError> {
    const OP: &str = "adam_update";
    check_len(OP, "grad", param, grad)?;
    check_len(OP, "m", param, m)?;
    check_len(OP, "v", param, v)?;
    if step == 0 {
        return Err(OpError::AdamStepZero);
    }
    Ok(())
}
