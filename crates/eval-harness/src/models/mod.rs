//! Model implementations on candle.

mod attention_cpu;
pub mod decoder;
pub mod linear;
pub mod t5;
pub(crate) mod vector_math;

pub use decoder::{Decoder, DecoderConfig, KvCache};
pub use t5::{EncoderOutput, T5Cache, T5Config, T5};
