//! Prompt templates: instruction (+ optional input) → the exact prompt text a model samples from.
//!
//! - [`Template::Korean`]: the reference workflow's template, byte for byte (GUIDE §1);
//! - [`Template::Alpaca`]: Stanford Alpaca's, with and without an input;
//! - [`Template::Chatml`]: one user turn in ChatML, then the assistant header;
//! - [`Template::Chat`]: the model's own chat template (tokenizer_config.json `chat_template`
//!   or chat_template.jinja), rendered as transformers' `apply_chat_template` does;
//! - [`Template::File`]: a user's Jinja file, given the same variables as a chat template
//!   plus `instruction` and `input`.
//!
//! The DPO-time `###질문:` wrapper of the reference workflow is not a prompt template: the
//! data keeps the prompt exactly as sampled and the trainer applies [`DpoWrapper`].

mod chat;
mod pyjson;

use std::path::Path;

pub use chat::{ChatMessage, ChatTemplate, parse_ordered_json};

use crate::error::{DataError, Result};

/// The reference workflow's sampling template; `{instruction}` is the only slot.
pub const KOREAN_TEMPLATE: &str = "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n{instruction}\n\n###답변:\n";

/// A prompt template.
#[derive(Debug, Clone)]
pub enum Template {
    Korean,
    Alpaca,
    Chatml,
    Chat(ChatTemplate),
    File(ChatTemplate),
}

impl Template {
    /// `korean`, `alpaca`, `chatml`, `chat` (needs `model_dir`), or a path to a Jinja file.
    pub fn from_name(name: &str, model_dir: Option<&Path>) -> Result<Template> {
        match name {
            "korean" => Ok(Template::Korean),
            "alpaca" => Ok(Template::Alpaca),
            "chatml" => Ok(Template::Chatml),
            "chat" => {
                let dir = model_dir.ok_or_else(|| DataError::Template {
                    name: "chat".into(),
                    message: "the model's chat template needs --tokenizer MODEL_DIR".into(),
                })?;
                Ok(Template::Chat(ChatTemplate::from_model_dir(dir)?))
            }
            path if Path::new(path).is_file() => {
                let (bos, eos) = match model_dir {
                    Some(dir) => chat::special_tokens(dir)?,
                    None => (String::new(), String::new()),
                };
                Ok(Template::File(ChatTemplate::from_file(
                    Path::new(path),
                    bos,
                    eos,
                )?))
            }
            other => Err(DataError::Template {
                name: other.into(),
                message:
                    "expected korean, alpaca, chatml, chat, or the path of a Jinja template file"
                        .into(),
            }),
        }
    }

    /// A short name for reports and dataset cards.
    pub fn name(&self) -> String {
        match self {
            Template::Korean => "korean".into(),
            Template::Alpaca => "alpaca".into(),
            Template::Chatml => "chatml".into(),
            Template::Chat(t) => format!("chat ({})", t.name()),
            Template::File(t) => format!("file ({})", t.name()),
        }
    }

    /// Renders the prompt for one row. Templates with a single slot (korean, chatml, chat)
    /// put a non-empty `input` after the instruction, separated by a blank line.
    pub fn render(&self, instruction: &str, input: Option<&str>) -> Result<String> {
        let joined = || match input {
            Some(inp) if !inp.is_empty() => format!("{instruction}\n\n{inp}"),
            _ => instruction.to_string(),
        };
        match self {
            Template::Korean => Ok(korean(&joined())),
            Template::Alpaca => Ok(alpaca(instruction, input)),
            Template::Chatml => Ok(chatml(&joined())),
            Template::Chat(t) => t.render(&[ChatMessage::new("user", joined())], true),
            Template::File(t) => t.render_row(instruction, input),
        }
    }
}

/// The reference workflow's template, exactly its f-string.
pub fn korean(instruction: &str) -> String {
    format!(
        "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n{instruction}\n\n###답변:\n"
    )
}

/// Stanford Alpaca's prompt (`prompt_input` when `input` is non-empty, else `prompt_no_input`).
pub fn alpaca(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(inp) if !inp.is_empty() => format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
        ),
        _ => format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    }
}

/// One ChatML user turn followed by the assistant header (what a ChatML chat template
/// renders with `add_generation_prompt=True`).
pub fn chatml(content: &str) -> String {
    format!("<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")
}

/// A prompt wrapper applied at DPO time by the trainer (never baked into the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DpoWrapper {
    /// The prompt as sampled (default; the only choice under which sampling-time log-probs
    /// are valid reference log-probs).
    #[default]
    None,
    /// The reference workflow's `###질문:\n{question}\n\n###답변:\n`.
    Question,
}

impl DpoWrapper {
    pub fn from_name(name: &str) -> Option<DpoWrapper> {
        match name {
            "none" => Some(DpoWrapper::None),
            "question" => Some(DpoWrapper::Question),
            _ => None,
        }
    }

    /// Applies the wrapper to a prompt from the data.
    pub fn apply(self, prompt: &str) -> String {
        match self {
            DpoWrapper::None => prompt.to_string(),
            DpoWrapper::Question => wrap_question(prompt),
        }
    }
}

/// The reference workflow's DPO-time wrapper, exactly: `###질문:\n{question}\n\n###답변:\n`.
pub fn wrap_question(question: &str) -> String {
    format!("###질문:\n{question}\n\n###답변:\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn korean_matches_the_reference_f_string() {
        // The reference: f"아래는 ... 답변해주세요.\n\n###지시사항:\n{instruction}\n\n###답변:\n"
        let expected = KOREAN_TEMPLATE.replace("{instruction}", "보험료는?");
        assert_eq!(korean("보험료는?"), expected);
        assert!(expected.ends_with("###답변:\n"));
        assert_eq!(
            Template::Korean.render("보험료는?", None).unwrap(),
            expected
        );
    }

    #[test]
    fn wrapper_is_exact_and_off_by_default() {
        assert_eq!(wrap_question("Q"), "###질문:\nQ\n\n###답변:\n");
        assert_eq!(DpoWrapper::default().apply("Q"), "Q");
        assert_eq!(
            DpoWrapper::from_name("question").unwrap().apply("Q"),
            "###질문:\nQ\n\n###답변:\n"
        );
    }

    #[test]
    fn alpaca_with_and_without_input() {
        assert!(alpaca("do", None).contains("### Instruction:\ndo\n\n### Response:\n"));
        let with = alpaca("do", Some("ctx"));
        assert!(
            with.contains("paired with an input")
                && with.contains("### Input:\nctx\n\n### Response:\n")
        );
        assert_eq!(alpaca("do", Some("")), alpaca("do", None));
    }

    #[test]
    fn template_files_see_instruction_input_and_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jinja");
        std::fs::write(&path, "[{{ instruction }}|{{ input }}|{{ messages[0]['content'] }}|{{ add_generation_prompt }}]\n").unwrap();
        let t = Template::from_name(path.to_str().unwrap(), None).unwrap();
        // Booleans print as Python's (True), as jinja2 prints them.
        assert_eq!(
            t.render("지시", Some("입력")).unwrap(),
            "[지시|입력|지시\n\n입력|True]"
        );
        assert!(Template::from_name("nonexistent-template", None).is_err());
        assert!(
            Template::from_name("chat", None)
                .unwrap_err()
                .to_string()
                .contains("--tokenizer")
        );
    }

    #[test]
    fn single_slot_templates_join_input() {
        assert_eq!(
            Template::Chatml.render("a", Some("b")).unwrap(),
            chatml("a\n\nb")
        );
    }
}
