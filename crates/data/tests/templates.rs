//! Chat templates against transformers: fixtures/templates/cases.json holds what
//! `tokenizer.apply_chat_template(..., tokenize=False)` rendered (transformers 5.17) for a
//! gemma-style and a chatml template; every case must match byte for byte, and every case
//! where the template raised must fail with the template's message.

use data::DataError;
use data::template::{ChatMessage, ChatTemplate, Template, parse_ordered_json};
use minijinja::Value;

fn field(case: &Value, key: &str) -> Value {
    case.get_attr(key)
        .unwrap_or_else(|e| panic!("case field {key}: {e}"))
}

#[test]
fn transformers_apply_chat_template_cases() {
    let dir = testkit::fixture("templates");
    let cases_path = dir.join("cases.json");
    if !cases_path.exists() {
        eprintln!(
            "NOTICE: {} is absent; skipping the transformers template cases",
            cases_path.display()
        );
        return;
    }
    let cases = parse_ordered_json(&std::fs::read_to_string(&cases_path).unwrap()).unwrap();
    let mut checked = 0;
    for case in cases.try_iter().unwrap() {
        let name = field(&case, "name").to_string();
        let file = field(&case, "template").to_string();
        let source = std::fs::read_to_string(dir.join(&file)).unwrap();
        let bos = field(&case, "bos_token").to_string();
        let eos = field(&case, "eos_token").to_string();
        let template = ChatTemplate::from_source(file.clone(), source, &bos, &eos);
        let got = template.render_value(
            field(&case, "messages"),
            field(&case, "add_generation_prompt").is_true(),
        );
        let expected = field(&case, "expected");
        if expected.is_undefined() {
            assert!(
                field(&case, "error").is_true(),
                "{name}: neither expected nor error"
            );
            match got {
                Err(DataError::Template { message, .. }) => {
                    assert_eq!(message, field(&case, "error_message").to_string(), "{name}")
                }
                other => panic!("{name}: expected the template to raise, got {other:?}"),
            }
        } else {
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, expected.to_string(), "{name}");
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} cases");
}

#[test]
fn model_dir_chat_template_renders_the_prompt_transformers_would() {
    let tokenizer = testkit::fixture("tokenizer");
    if !tokenizer.join("tokenizer_config.json").exists() {
        eprintln!("NOTICE: fixtures/tokenizer is absent; skipping");
        return;
    }
    // The fixture tokenizer's chat_template is templates/gemma.jinja; its case
    // "gemma_korean_template_prompt" is a one-user-turn prompt like `pairs --template chat` makes.
    let template = Template::from_name("chat", Some(&tokenizer)).unwrap();
    let instruction = "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n보험 계약을 해지하면 환급금은 얼마나 받을 수 있나요?\n\n###답변:\n";
    let got = template.render(instruction, None).unwrap();
    let want = "<bos><start_of_turn>user\n아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n보험 계약을 해지하면 환급금은 얼마나 받을 수 있나요?\n\n###답변:<end_of_turn>\n<start_of_turn>model\n";
    assert_eq!(got, want);
    if let Template::Chat(t) = &template {
        let err = t
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                true,
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
    }
}

#[test]
fn builtin_chatml_equals_the_chatml_file_given_a_system_turn() {
    let file = testkit::fixture("templates/chatml.jinja");
    if !file.exists() {
        eprintln!("NOTICE: {} is absent; skipping", file.display());
        return;
    }
    // The fixture's chatml.jinja adds a default system turn; with our own system turn first,
    // the user turn and assistant header it renders must equal the built-in chatml prompt.
    let t = ChatTemplate::from_source("chatml", std::fs::read_to_string(&file).unwrap(), "", "");
    let messages = [
        ChatMessage::new("system", "S"),
        ChatMessage::new("user", "질문\n둘째 줄"),
    ];
    let got = t.render(&messages, true).unwrap();
    let system = "<|im_start|>system\nS<|im_end|>\n";
    assert_eq!(
        got,
        format!("{system}{}", data::template::chatml("질문\n둘째 줄"))
    );
}
