//! Model implementations on candle.

pub mod decoder;

pub use decoder::{Decoder, DecoderConfig, KvCache};
