//! `--device auto|cpu|cuda`: where merges and evaluation run. No device ids: the GPU is the
//! first one `CUDA_VISIBLE_DEVICES` leaves visible, as the competition required.

use anyhow::{bail, Result};
use candle_core::Device;

/// Resolve a device setting. `auto` is CUDA when this binary was built with the `cuda` feature
/// and a GPU is visible, else the CPU.
pub fn resolve(setting: &str) -> Result<Device> {
    match setting {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            // candle appends a backtrace to some errors; the first line says what went wrong.
            let e = e.to_string();
            let e = e.lines().next().unwrap_or_default().to_string();
            anyhow::anyhow!(
                "cannot use CUDA: {e}{}",
                if cfg!(feature = "cuda") {
                    " (is a GPU visible? check CUDA_VISIBLE_DEVICES and the driver)"
                } else {
                    " (this binary was built without the `cuda` feature: see scripts/build-cuda.sh)"
                }
            )
        }),
        "auto" => Ok(if cfg!(feature = "cuda") {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        other => bail!("unknown device `{other}`: use auto, cpu or cuda"),
    }
}

/// A short name for reports.
pub fn name(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        assert!(matches!(resolve("cpu").unwrap(), Device::Cpu));
        assert!(resolve("cuda:1").is_err(), "device ids are not accepted");
        if !cfg!(feature = "cuda") {
            assert!(matches!(resolve("auto").unwrap(), Device::Cpu));
            let err = resolve("cuda").unwrap_err().to_string();
            assert!(err.contains("build-cuda.sh"), "{err}");
        }
    }
}
