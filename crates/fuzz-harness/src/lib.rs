//! The kit's parsers of untrusted input, each behind one function that takes the bytes of a
//! file and reads them as the kit does, all the way to the values it would use (tensors
//! loaded, parameters resolved, paths expanded). Errors are the expected outcome for most
//! inputs and are ignored; what must never happen is a panic, a hang, or an allocation sized
//! by a field the input does not back.
//!
//! The libFuzzer targets in `fuzz/` are one line each over these functions, and
//! `tests/corpus.rs` feeds every committed corpus and regression file through them in
//! `cargo test`.

mod checkpoints;
mod configs;
mod data;
pub mod fixtures;
mod submissions;

pub use checkpoints::{adapter, pth, pth_pickle, safetensors};
pub use configs::{config_json, merge_toml, mergekit_yaml, tokenizer_config};
pub use data::{answer_choices, dataset_csv};
pub use submissions::{entry_toml, submission_tar};

/// A harness: the bytes of one input file.
pub type Target = fn(&[u8]);

/// Every target by the name its fuzz target, corpus and regression directories have.
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("pth", pth),
    ("pth_pickle", pth_pickle),
    ("adapter", adapter),
    ("config_json", config_json),
    ("tokenizer_config", tokenizer_config),
    ("dataset_csv", dataset_csv),
    ("answer_choices", answer_choices),
    ("merge_toml", merge_toml),
    ("mergekit_yaml", mergekit_yaml),
    ("entry_toml", entry_toml),
    ("submission_tar", submission_tar),
];
