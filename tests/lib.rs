//! Test support shared by the workspace's tests: tiny models in real Hugging Face layouts
//! (config.json + safetensors, sharded or not, PEFT adapters), the synthetic weights and the
//! fixtures of the evaluation goldens, a local server that speaks the hub's HTTP API, offline
//! resolvers, max-|diff| comparisons of tensors and checkpoints, and end-to-end runs of the
//! binary. Nothing here needs the network or `../shared`.

pub mod cli;
pub mod compare;
pub mod family;
pub mod faults;
pub mod goldens;
pub mod hub;
pub mod models;
pub mod resolver;
pub mod synthetic;
pub mod tokenizers;
