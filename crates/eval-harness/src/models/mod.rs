//! Model implementations on candle.

pub mod decoder;
pub mod linear;

pub use decoder::{Decoder, DecoderConfig, KvCache};
