//! merge-core: checkpoints in, merged checkpoint out. Runs no model.
//!
//! - [`source`]: where a model comes from (local directory or hub repo at a revision);
//! - [`checkpoint`]: reading safetensors / PyTorch `.bin` tensor by tensor, writing sharded
//!   safetensors atomically;
//! - [`lora`]: PEFT LoRA adapters as dense deltas, and adapter output;
//! - [`config`]: the merge config schema; [`mergekit_yaml`]: mergekit's YAML configs read into it;
//! - [`methods`]: merge methods behind one trait and a registry;
//! - [`adapter_merge`]: LoRA-to-LoRA merges that output an adapter (`lora_avg`, `cat`, `svd`);
//! - [`sparsify`]: task-vector sparsification (magnitude, breadcrumbs, DARE, DELLA);
//! - [`merge`]: planning and streaming execution.

pub mod adapter_merge;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod lora;
pub mod merge;
pub mod mergekit_yaml;
pub mod methods;
pub mod model;
pub mod source;
pub mod sparsify;

pub use config::MergeConfig;
pub use error::{Error, Result};
