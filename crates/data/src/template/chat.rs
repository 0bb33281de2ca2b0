//! Chat templates rendered the way transformers' `apply_chat_template` renders them.
//!
//! transformers compiles the template in a sandboxed jinja2 environment with `trim_blocks`
//! and `lstrip_blocks`, the loop-controls extension, a `tojson` filter that calls
//! `json.dumps(x, ensure_ascii=False, ...)` (no HTML escaping), and the globals
//! `raise_exception` and `strftime_now`; the context holds `messages`,
//! `add_generation_prompt`, and the special tokens (`bos_token`, `eos_token`, …) as text.
//! We reproduce that with minijinja plus minijinja-contrib's Python-compatible methods
//! (`.strip()`, `.items()`, `.get()`, …) and our own [`super::pyjson`] for `tojson`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use super::pyjson;
use crate::error::{DataError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled-on-use chat template plus the special tokens its context needs.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    name: String,
    source: Arc<str>,
    /// `bos_token`, `eos_token`, … as transformers passes them (text, not ids).
    special_tokens: Vec<(String, String)>,
}

/// Special-token keys transformers puts into the template context when set.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl ChatTemplate {
    /// A template from source text; `bos`/`eos` fill `bos_token`/`eos_token`.
    pub fn from_source(
        name: impl Into<String>,
        source: impl Into<String>,
        bos: &str,
        eos: &str,
    ) -> Self {
        ChatTemplate {
            name: name.into(),
            source: Arc::from(source.into()),
            special_tokens: vec![
                ("bos_token".into(), bos.into()),
                ("eos_token".into(), eos.into()),
            ],
        }
    }

    /// A template file (a user's, or a standalone chat_template.jinja).
    pub fn from_file(path: &Path, bos: String, eos: String) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self::from_source(
            path.display().to_string(),
            source,
            &bos,
            &eos,
        ))
    }

    /// The model's template: `chat_template.jinja` when present (transformers prefers it),
    /// else tokenizer_config.json's `chat_template` (a string, or a list of named templates of
    /// which `default` is used).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config = read_tokenizer_config(dir)?;
        let special_tokens = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|k| {
                config
                    .as_ref()
                    .and_then(|c| token_text(c.get(*k)?))
                    .map(|t| (k.to_string(), t))
            })
            .collect();
        let jinja = dir.join("chat_template.jinja");
        let (name, source) = if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| DataError::io(&jinja, e))?;
            (jinja.display().to_string(), source)
        } else {
            let config_path = dir.join("tokenizer_config.json");
            let source = config
                .as_ref()
                .and_then(|c| chat_template_field(c.get("chat_template")?))
                .ok_or_else(|| DataError::Template {
                    name: dir.display().to_string(),
                    message: format!(
                        "no chat template: neither {} nor a chat_template in {}",
                        jinja.display(),
                        config_path.display()
                    ),
                })?;
            (config_path.display().to_string(), source)
        };
        Ok(ChatTemplate {
            name,
            source: Arc::from(source),
            special_tokens,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders a conversation (transformers' `apply_chat_template(..., tokenize=False)`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                ordered(vec![
                    ("role".into(), Value::from(m.role.as_str())),
                    ("content".into(), Value::from(m.content.as_str())),
                ])
            })
            .collect();
        self.render_values(Value::from(messages), add_generation_prompt, &[])
    }

    /// Renders messages already in template form (see [`parse_ordered_json`]): any keys,
    /// any JSON values, in their order.
    pub fn render_value(&self, messages: Value, add_generation_prompt: bool) -> Result<String> {
        self.render_values(messages, add_generation_prompt, &[])
    }

    /// A user template file's rendering of one row: the chat-template context plus
    /// `instruction` and `input`.
    pub(crate) fn render_row(&self, instruction: &str, input: Option<&str>) -> Result<String> {
        let content = match input {
            Some(i) if !i.is_empty() => format!("{instruction}\n\n{i}"),
            _ => instruction.to_string(),
        };
        let messages = Value::from(vec![ordered(vec![
            ("role".into(), Value::from("user")),
            ("content".into(), Value::from(content)),
        ])]);
        let extra = [
            ("instruction", Value::from(instruction)),
            ("input", Value::from(input.unwrap_or(""))),
        ];
        self.render_values(messages, true, &extra)
    }

    fn render_values(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        extra: &[(&str, Value)],
    ) -> Result<String> {
        let env = environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| self.error(&e))?;
        let mut context: Vec<(String, Value)> = vec![
            ("messages".into(), messages),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ];
        for (k, v) in &self.special_tokens {
            context.push((k.clone(), Value::from(v.as_str())));
        }
        for (k, v) in extra {
            context.push((k.to_string(), v.clone()));
        }
        template
            .render(ordered(context))
            .map_err(|e| self.error(&e))
    }

    fn error(&self, e: &Error) -> DataError {
        // raise_exception's message is the template author's: show it as is.
        let message = match (e.kind(), e.detail()) {
            (ErrorKind::InvalidOperation, Some(detail)) if detail.starts_with(RAISED) => {
                detail[RAISED.len()..].to_string()
            }
            _ => e.to_string(),
        };
        DataError::Template {
            name: self.name.clone(),
            message,
        }
    }
}

const RAISED: &str = "raise_exception: ";

/// The environment transformers builds, in minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .unwrap_or_default();
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED}{message}"),
            ))
        },
    );
    env.add_function(
        "strftime_now",
        |format: String| -> std::result::Result<Value, Error> {
            Ok(Value::from(strftime_now(&format)))
        },
    );
    env.add_filter(
        "tojson",
        |value: Value, kwargs: Kwargs| -> std::result::Result<Value, Error> {
            let options = pyjson::Options {
                ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
                indent: kwargs.get::<Option<usize>>("indent")?,
                sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
                separators: kwargs.get::<Option<Vec<String>>>("separators")?.map(|s| {
                    (
                        s.first().cloned().unwrap_or_default(),
                        s.get(1).cloned().unwrap_or_default(),
                    )
                }),
            };
            kwargs.assert_all_used()?;
            pyjson::dumps(&value, &options).map(Value::from)
        },
    );
    env
}

/// A map that keeps insertion order (Python dicts do; templates may `tojson` them).
#[derive(Debug)]
struct OrderedMap(Vec<(String, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<Value> = self
            .0
            .iter()
            .map(|(k, _)| Value::from(k.as_str()))
            .collect();
        Enumerator::Iter(Box::new(keys.into_iter()))
    }
}

fn ordered(pairs: Vec<(String, Value)>) -> Value {
    Value::from_object(OrderedMap(pairs))
}

/// Parses JSON text into a template value, keeping object keys in file order (Python dicts
/// keep insertion order and `tojson` prints it; serde_json's own map would sort them) and
/// integers apart from floats.
pub fn parse_ordered_json(text: &str) -> std::result::Result<Value, serde_json::Error> {
    serde_json::from_str::<OrderedJson>(text).map(|v| v.0)
}

struct OrderedJson(Value);

impl<'de> serde::Deserialize<'de> for OrderedJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(())))
            }
            fn visit_none<E>(self) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(())))
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(b)))
            }
            fn visit_i64<E>(self, i: i64) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(i)))
            }
            fn visit_u64<E>(self, u: u64) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(u)))
            }
            fn visit_f64<E>(self, f: f64) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(f)))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(s)))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<OrderedJson, E> {
                Ok(OrderedJson(Value::from(s)))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<OrderedJson, A::Error> {
                let mut items = Vec::new();
                while let Some(OrderedJson(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(OrderedJson(Value::from(items)))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedJson, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, OrderedJson(v))) = map.next_entry::<String, OrderedJson>()? {
                    pairs.push((k, v));
                }
                Ok(OrderedJson(ordered(pairs)))
            }
        }
        d.deserialize_any(V)
    }
}

fn read_tokenizer_config(dir: &Path) -> Result<Option<Json>> {
    let path: PathBuf = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        DataError::parse(
            &path,
            format!("line {}, column {}", e.line(), e.column()),
            e.to_string(),
        )
    })
}

/// `"<bos>"` or an AddedToken dict `{"content": "<bos>", ...}`.
fn token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A template string, or `[{"name": ..., "template": ...}]` of which `default` is used.
fn chat_template_field(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// The bos/eos text of a model dir's tokenizer_config.json (empty when absent), for user
/// template files that print them.
pub(crate) fn special_tokens(dir: &Path) -> Result<(String, String)> {
    let config = read_tokenizer_config(dir)?;
    let get = |k: &str| {
        config
            .as_ref()
            .and_then(|c| token_text(c.get(k)?))
            .unwrap_or_default()
    };
    Ok((get("bos_token"), get("eos_token")))
}

/// transformers' `strftime_now(fmt)`: the current UTC time through a small strftime
/// (%Y %m %d %H %M %S %b %B %y %j %%; other directives are kept as written).
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

    #[test]
    fn gemma_style_template_renders_and_raises() {
        let t = ChatTemplate::from_source("gemma", GEMMA, "<bos>", "<eos>");
        let got = t
            .render(&[ChatMessage::new("user", " 안녕하세요 \n")], true)
            .unwrap();
        assert_eq!(
            got,
            "<bos><start_of_turn>user\n안녕하세요<end_of_turn>\n<start_of_turn>model\n"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], true)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "template gemma: System role not supported");
    }

    /// `src` rendered without special tokens or a generation prompt.
    fn render(src: &str, messages: &[ChatMessage]) -> String {
        ChatTemplate::from_source("t", src, "", "")
            .render(messages, false)
            .unwrap()
    }

    #[test]
    fn trim_and_lstrip_blocks_match_jinja2() {
        // jinja2 with trim_blocks + lstrip_blocks renders this as "a\nb\n".
        let src = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let got = render(
            src,
            &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
        );
        assert_eq!(got, "a\nb\n");
    }

    #[test]
    fn python_methods_and_tojson_without_ascii_escape() {
        let src = "{{ messages[0].content.strip().upper() }}|{{ messages[0] | tojson }}|{{ {'a': 1.0, 'b': '<&>'} | tojson(indent=2) }}";
        let got = render(src, &[ChatMessage::new("user", " hi 한 ")]);
        assert_eq!(
            got,
            "HI 한|{\"role\": \"user\", \"content\": \" hi 한 \"}|{\n  \"a\": 1.0,\n  \"b\": \"<&>\"\n}"
        );
    }

    #[test]
    fn model_dir_prefers_jinja_file_and_reads_added_token_dicts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "chat_template": "CFG{{ bos_token }}"}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "CFG<s>");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "FILE{{ eos_token }}\n",
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(dir.path()).unwrap();
        // jinja2 drops one trailing newline of the source (keep_trailing_newline=False).
        assert_eq!(t.render(&[], false).unwrap(), "FILE</s>");
    }

    #[test]
    fn missing_template_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        let err = ChatTemplate::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no chat template"), "{err}");
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", 0), "1970-01-01 00:00:00");
        // 2024-02-29 12:34:56 UTC (leap day).
        assert_eq!(
            strftime("%d %b %Y, %B %j %y %%", 1_709_210_096),
            "29 Feb 2024, February 060 24 %"
        );
    }
}
