//! `--device cpu|cuda[:N]`: the device a command trains, evaluates or scores on.
//!
//! A [`DeviceSpec`] is what the user wrote; [`DeviceSpec::open`] turns it into a candle
//! [`Device`]. Opening is where a missing GPU is reported: a binary built without the `cuda`
//! feature says how to build one with it, and a CUDA build without a usable GPU or driver names the
//! device and the driver's error. Every command opens its device once: candle refuses to mix
//! tensors of two handles of the same GPU, so the handle is cached per ordinal for the process.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use rankstack_nn::{Error, Result};

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// CUDA device `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::input("device", "device", format!("{s:?}: expected cpu, cuda or cuda:N"));
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Whether this is the CPU.
    pub fn is_cpu(self) -> bool {
        self == Self::Cpu
    }

    /// The candle device (the same handle for every call with the same ordinal).
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut open = OPEN.get_or_init(Default::default).lock().expect("device cache lock poisoned");
    if let Some(d) = open.get(&ordinal) {
        return Ok(d.clone());
    }
    // cudarc panics (rather than failing) when the driver library cannot be loaded at all.
    let made = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    let device = match made {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            return Err(Error::input(
                "device",
                "device",
                format!(
                "cuda:{ordinal} could not be opened ({e}); check that a GPU and its driver are present (nvidia-smi)"
            ),
            ))
        }
        Err(_) => {
            return Err(Error::input(
                "device",
                "device",
                format!("cuda:{ordinal}: the CUDA driver library could not be loaded; is an NVIDIA driver installed?"),
            ))
        }
    };
    open.insert(ordinal, device.clone());
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::input(
        "device",
        "device",
        format!(
            "cuda:{ordinal} asked for, but this rankstack was built without CUDA: build it with \
             `cargo build --release --features cuda` (or `cargo xtask gpu-bundle` on a machine without CUDA)"
        ),
    ))
}

/// Whether an error is the device running out of memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, or a
/// failed host allocation that candle reports).
pub fn is_out_of_memory(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY") || text.contains("out of memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU0", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_opens() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_only_build_says_how_to_get_cuda() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("built without CUDA") && err.contains("--features cuda"), "{err}");
    }
}
