//! The learner: a small MLP regressor trained with the same algorithm on the CPU or on a CUDA GPU,
//! and the learner agent ([`run`]) that follows finished tasks, retrains and publishes. The model
//! it trains (the feature schema, the MLP's weights and forward pass, the `Predictor` the scheduler
//! loads) is `colony-model`'s; this crate adds everything that only training needs.
//!
//! Training is written once, in [`train`], over the [`Backend`] trait's primitive operations
//! (three GEMM forms with a fused bias/ReLU epilogue, the ReLU derivative, the MSE loss and its
//! gradient, column sums and an Adam step). [`cpu`] is the reference implementation of exactly that
//! math; [`gpu`] runs the hand-written kernels in `kernels/*.cu` through cudarc. This is the only
//! Colony crate that depends on cudarc, and `gpu` is its only module with `unsafe` code.
//!
//! A new model's initial weights come from [`init`]; a finished task becomes a training example
//! in [`example`]; [`decide`] trains, evaluates against the per-kind [`baseline`] and the current
//! model, and decides whether to publish; [`learner`] is the agent around it, with its data
//! directory in [`store`] and its Prometheus metrics in [`metrics`].
//!
//! A machine without a CUDA driver is the normal case, not an error: [`Device::Auto`] falls back
//! to the CPU, and nothing here calls into cudarc before probing that its library can be loaded,
//! because cudarc panics when it cannot find one.

pub mod adam;
pub mod backend;
pub mod baseline;
pub mod bench;
pub mod cpu;
pub mod decide;
pub mod device;
pub mod example;
pub mod gpu;
pub mod init;
pub mod kernels;
pub mod learner;
pub mod metrics;
pub mod store;
pub mod train;

pub use adam::{AdamConfig, AdamError};
pub use backend::{Backend, BackendError, Epilogue, GemmDims, OpError};
pub use cpu::CpuBackend;
pub use device::{Device, DeviceError, DeviceParseError, SelectedBackend};
pub use gpu::{CudaBackend, GpuError};
pub use init::{new_mlp, MlpConfig};
pub use learner::{run, LearnerConfig};
pub use train::{TrainError, Trainer};
