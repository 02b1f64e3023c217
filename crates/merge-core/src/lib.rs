//! merge-core: checkpoints in, merged tensors out. Runs no model.
//!
//! Modules, each importing only those listed before it:
//! - [`error`]; [`tensor`]: f32 slice helpers shared by methods, streaming and the writer;
//! - [`source`]: where a model comes from (local directory, hub repo at a revision, aliases
//!   registered from outside such as the demo's `demo:`);
//! - [`checkpoint`]: reading safetensors / PyTorch `.bin` tensor by tensor, writing sharded
//!   safetensors atomically;
//! - [`config`]: the merge config schema (our TOML, mergekit's YAML);
//! - [`input_stats`]: a model's input statistics (Gram matrices) for data-dependent merges;
//! - [`params`]: declared, typed parameters and their resolution per tensor;
//! - [`methods`]: tensor-level merge methods behind one trait;
//! - [`adapter`]: PEFT LoRA adapters, and the adapter-level merges (`lora_avg`, `cat`, `svd`);
//! - [`registry`]: every method by name, and configs checked against it;
//! - [`engine`]: inputs → plan → execute → output, to disk or into memory.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod input_stats;
pub mod methods;
pub mod params;
pub mod registry;
pub mod source;
pub mod tensor;

pub use config::MergeConfig;
pub use error::{Error, Result};
