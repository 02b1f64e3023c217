//! Test support shared by the workspace's tests: tiny models in real Hugging Face layouts
//! (config.json + safetensors, sharded or not, PEFT adapters), the synthetic weights of the
//! evaluation goldens, and a local server that speaks the hub's HTTP API. Nothing here needs
//! the network or `../shared`.

pub mod cli;
pub mod family;
pub mod hub;
pub mod models;
pub mod synthetic;
pub mod tokenizers;
