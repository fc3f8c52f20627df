//! `tokenizer.json` through the `tokenizers` crate.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A loaded tokenizer that remembers its file, for error messages.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::missing(path, "tokenizer.json of the model"));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::bad(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Tokenizer { inner, path: path.to_path_buf() })
    }

    /// Token ids of `text`, without special tokens (the perplexity protocol).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::bad(&self.path, format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::bad(&self.path, format!("cannot decode ids: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
