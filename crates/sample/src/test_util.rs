//! Test helpers: the fixture tokenizer, found at run time.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokenizers::Tokenizer;

/// fixtures/tokenizer/tokenizer.json, found by walking up from the current directory (the
/// build-time manifest path differs on the GPU machine). Loaded once per test binary.
pub(crate) fn fixture_tokenizer() -> Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = find_fixture("tokenizer/tokenizer.json");
        Arc::new(Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    })
    .clone()
}

fn find_fixture(rel: &str) -> PathBuf {
    let start = std::env::current_dir().expect("current dir");
    for dir in start.ancestors() {
        let p = dir.join("fixtures").join(rel);
        if p.is_file() {
            return p;
        }
    }
    panic!("fixtures/{rel} not found above {}", start.display());
}
