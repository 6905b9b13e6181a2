//! Device selection. CPU always; CUDA and Metal when built with the `cuda` / `metal` features.
//! The model code is the same on every device; only this choice differs.

use std::str::FromStr;

use candle_core::Device;

use crate::error::ConfigError;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, ord) = match s.split_once(':') {
            Some((k, o)) => (
                k,
                o.parse::<usize>().map_err(|_| ConfigError::DeviceIndex {
                    device: s.to_string(),
                    index: o.to_string(),
                })?,
            ),
            None => (s, 0),
        };
        match kind {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(ord)),
            "metal" => Ok(DeviceChoice::Metal(ord)),
            _ => Err(ConfigError::UnknownDevice(s.to_string()).into()),
        }
    }
}

impl DeviceChoice {
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(i) => {
                if cfg!(feature = "cuda") {
                    Ok(Device::new_cuda(i)?)
                } else {
                    Err(ConfigError::NotBuiltWith("cuda").into())
                }
            }
            DeviceChoice::Metal(i) => {
                if cfg!(feature = "metal") {
                    Ok(Device::new_metal(i)?)
                } else {
                    Err(ConfigError::NotBuiltWith("metal").into())
                }
            }
        }
    }
}
