//! The Compactor engine: opens Hugging Face checkpoints of the Llama family, runs them on candle
//! (CPU, or CUDA with the `cuda` feature) with pluggable linear layers, and evaluates them.
//!
//! It is a library with no GUI or terminal dependencies: the `compactor` CLI and the desktop
//! app are thin layers over it. The matrix decompositions themselves live in the
//! `compactor-decomp` crate.

pub mod checkpoint;
pub mod compressed;
pub mod config;
#[cfg(feature = "cuda")]
pub mod decode_stack;
pub mod error;
pub mod eval;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpu_band;
#[cfg(feature = "cuda")]
pub mod gpu_filter;
#[cfg(feature = "cuda")]
pub mod gpu_step;
#[cfg(feature = "cuda")]
pub mod gpu_tn;
pub mod heal;
pub mod inventory;
pub mod linear;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod run;
pub mod synth;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use model::{Model, Role};

/// The device named by `cpu` or `cuda[:N]`.
pub fn device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ord = n.strip_prefix("cuda:").map(|s| s.parse::<usize>()).transpose().map_err(|_| Error::Invalid(format!("bad device `{n}`")))?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Invalid("this build of Compactor has no CUDA support: rebuild with `--features cuda` (scripts/build-cuda.sh)".into()));
            }
            let d = candle_core::Device::new_cuda(ord)?;
            #[cfg(feature = "cuda")]
            {
                gpu::single_stream(&d);
                gpu::prewarm_modules(ord);
            }
            Ok(d)
        }
        other => Err(Error::Invalid(format!("unknown device `{other}` (expected cpu or cuda)"))),
    }
}
