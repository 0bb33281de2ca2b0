//! Test helpers: the fixture tokenizer, found at run time.

use std::sync::{Arc, OnceLock};

use tokenizers::Tokenizer;

/// fixtures/tokenizer/tokenizer.json (found at run time: the build-time manifest path differs
/// on the GPU machine). Loaded once per test binary.
pub(crate) fn fixture_tokenizer() -> Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = testkit::fixture("tokenizer/tokenizer.json");
        Arc::new(Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    })
    .clone()
}
