//! The Hugging Face token: found, used in one header, never shown.

use std::path::PathBuf;

use crate::error::{DataError, Result};

/// A Hub token. `Debug` and `Display` print `***`; the text is reachable only through
/// [`Token::bearer`], which builds the Authorization header value.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Where the token came from (shown to the user instead of the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Flag,
    Env,
    File(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Flag => f.write_str("--token"),
            TokenSource::Env => f.write_str("HF_TOKEN"),
            TokenSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Token {
    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// The token text, for this crate's tests.
    #[cfg(test)]
    fn expose_for_comparison(&self) -> &str {
        &self.0
    }

    /// `--token`, else `HF_TOKEN`, else the token file: `HF_TOKEN_PATH`, or `$HF_HOME/token`
    /// (`HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`),
    /// as huggingface_hub looks for it.
    pub fn resolve(flag: Option<&str>) -> Result<(Token, TokenSource)> {
        let clean = |s: &str| s.trim().to_string();
        if let Some(t) = flag.map(clean).filter(|t| !t.is_empty()) {
            return Ok((Token(t), TokenSource::Flag));
        }
        if let Some(t) = std::env::var("HF_TOKEN")
            .ok()
            .map(|s| clean(&s))
            .filter(|t| !t.is_empty())
        {
            return Ok((Token(t), TokenSource::Env));
        }
        let path = token_path();
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => {
                Ok((Token(clean(&text)), TokenSource::File(path)))
            }
            _ => Err(DataError::Hub(format!(
                "no token: pass --token, set HF_TOKEN, or save one in {} (huggingface-cli login)",
                path.display()
            ))),
        }
    }
}

fn token_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_TOKEN_PATH") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("huggingface")
        });
    home.join("token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_token() {
        let t = Token("hf_secret123".into());
        assert_eq!(format!("{t} {t:?}"), "*** Token(***)");
        assert_eq!(t.bearer(), "Bearer hf_secret123");
    }

    #[test]
    fn flag_wins_and_is_trimmed() {
        let (t, source) = Token::resolve(Some(" hf_abc \n")).unwrap();
        assert_eq!(t.expose_for_comparison(), "hf_abc");
        assert_eq!(source, TokenSource::Flag);
    }
}
