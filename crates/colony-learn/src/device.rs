//! Choosing where the learner trains: `auto`, `cpu` or `cuda:N`, parsed from configuration.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use tracing::info;

use crate::cpu::CpuBackend;
use crate::gpu::{CudaBackend, GpuError};

/// A training device as the operator names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA device 0 if it can be opened, else the CPU.
    Auto,
    Cpu,
    /// CUDA device N; an error if it cannot be opened.
    Cuda(usize),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceParseError {
    #[error("unknown device {input:?}: expected `auto`, `cpu` or `cuda:N`")]
    Unknown { input: String },
    #[error("bad CUDA device {input:?}: expected `cuda:N` with N a device number such as 0")]
    BadOrdinal { input: String },
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("CUDA device {index} is not usable")]
    Unavailable {
        index: usize,
        #[source]
        source: GpuError,
    },
}

/// The backend a [`Device`] resolved to. Training code is generic over [`crate::Backend`], so
/// the caller matches once and calls it with either.
pub enum SelectedBackend {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl FromStr for Device {
    type Err = DeviceParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            _ => {
                let ordinal = input
                    .strip_prefix("cuda:")
                    .ok_or_else(|| DeviceParseError::Unknown { input: input.to_string() })?;
                // `parse` alone would accept "+0"; a device number is plain digits.
                if ordinal.is_empty() || !ordinal.bytes().all(|byte| byte.is_ascii_digit()) {
                    return Err(DeviceParseError::BadOrdinal { input: input.to_string() });
                }
                ordinal
                    .parse()
                    .map(Device::Cuda)
                    .map_err(|_| DeviceParseError::BadOrdinal { input: input.to_string() })
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl Device {
    /// Opens the backend. `Auto` never fails: without a usable GPU it logs why and uses the CPU.
    pub fn resolve(self) -> Result<SelectedBackend, DeviceError> {
        match self {
            Device::Cpu => Ok(SelectedBackend::Cpu(CpuBackend)),
            Device::Cuda(index) => CudaBackend::new(index)
                .map(|backend| SelectedBackend::Cuda(Box::new(backend)))
                .map_err(|source| DeviceError::Unavailable { index, source }),
            Device::Auto => match CudaBackend::new(0) {
                Ok(backend) => Ok(SelectedBackend::Cuda(Box::new(backend))),
                Err(reason) => {
                    info!(%reason, "no usable CUDA device; the learner trains on the CPU");
                    Ok(SelectedBackend::Cpu(CpuBackend))
                }
            },
        }
    }
}

impl SelectedBackend {
    pub fn describe(&self) -> String {
        use crate::backend::Backend;
        match self {
            SelectedBackend::Cpu(backend) => backend.describe(),
            SelectedBackend::Cuda(backend) => backend.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("auto".parse(), Ok(Device::Auto));
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda:0".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:12".parse(), Ok(Device::Cuda(12)));
        for device in [Device::Auto, Device::Cpu, Device::Cuda(3)] {
            assert_eq!(device.to_string().parse(), Ok(device));
        }
    }

    #[test]
    fn rejects_bad_devices_with_clear_errors() {
        for input in ["", "gpu", "CPU", "cuda", " auto", "cuda0"] {
            let error = input.parse::<Device>();
            assert_eq!(error, Err(DeviceParseError::Unknown { input: input.to_string() }));
        }
        for input in
            ["cuda:", "cuda:x", "cuda:-1", "cuda:+0", "cuda:1.5", "cuda:99999999999999999999999"]
        {
            let error = input.parse::<Device>();
            assert_eq!(error, Err(DeviceParseError::BadOrdinal { input: input.to_string() }));
        }
        let message = match "gpu".parse::<Device>() {
            Err(error) => error.to_string(),
            Ok(device) => panic!("parsed {device}"),
        };
        assert_eq!(message, "unknown device \"gpu\": expected `auto`, `cpu` or `cuda:N`");
    }

    /// On a machine without a CUDA driver (this crate's usual test machine) `auto` must pick the
    /// CPU, and `cuda:0` must be an error, both without panicking.
    #[test]
    fn auto_falls_back_to_the_cpu_without_a_driver() {
        if crate::gpu::driver_available() {
            crate::gpu::tests::skipped(
                "auto_falls_back_to_the_cpu_without_a_driver",
                "libcuda is present here",
            );
            return;
        }
        assert!(matches!(Device::Auto.resolve(), Ok(SelectedBackend::Cpu(_))));
        assert!(matches!(
            Device::Cuda(0).resolve(),
            Err(DeviceError::Unavailable { index: 0, source: GpuError::NoDriver })
        ));
    }

    #[test]
    fn auto_never_fails() {
        let backend = Device::Auto.resolve();
        assert!(backend.is_ok());
    }
}
