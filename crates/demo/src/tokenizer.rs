//! The demo tokenizer: byte-pair encoding trained with the tokenizers crate's trainer on the
//! skills' text, with SentencePiece-style `▁` word boundaries (Metaspace), as Llama 2's
//! tokenizer.json has, so the eval harness treats it as the Llama tokenizers it scores.

use anyhow::{anyhow, Result};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// Special tokens, in id order.
pub const UNK: &str = "<unk>";
/// Beginning of sequence.
pub const BOS: &str = "<s>";
/// End of sequence.
pub const EOS: &str = "</s>";

/// Trains the tokenizer on `corpus`.
pub fn train(corpus: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let meta = Metaspace::new('▁', PrependScheme::First, true);
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(
        BPE::builder()
            .unk_token(UNK.into())
            .build()
            .map_err(|e| anyhow!("{e}"))?,
    )
    .with_normalizer(None)
    .with_pre_tokenizer(Some(meta.clone().into()))
    .with_post_processor(None)
    .with_decoder(Some(meta.into()))
    .build()
    .map_err(|e| anyhow!("{e}"))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(
            [UNK, BOS, EOS]
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .build();
    tok.train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    Ok(tok.into())
}

/// `tokenizer_config.json`: Llama-2 conventions (BOS added to inputs; the kit's target
/// tokenizer appends EOS), no space clean-up.
pub fn tokenizer_config() -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 64,
        "padding_side": "left",
    })
}
