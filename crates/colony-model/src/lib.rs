//! The model the scheduler uses: how a task becomes features ([`features`], schema
//! [`features::SCHEMA`]), the MLP's weights and forward pass ([`mlp`]), and the [`Predictor`]
//! that checks a published model once and then predicts a task's runtime and peak memory
//! ([`predictor`]).
//!
//! This is everything a server needs to use a model and nothing it needs to train one: training
//! (the backends, CUDA, Adam, the trainer and the learner agent) lives in `colony-learn`, which
//! builds on these types. Like `colony-core`, this crate does no I/O, reads no clock, draws no
//! random numbers and has no async code, so the leader can run it inline and any process decodes
//! a model's weights and computes its features exactly alike.

pub mod features;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod mlp;
pub mod predictor;

pub use mlp::{Layer, Mlp, MlpError};
pub use predictor::{encode_weights, ModelError, Prediction, Predictor, WEIGHTS_BYTES_MAX};
