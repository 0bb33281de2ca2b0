//! Python's `json.dumps`, as transformers' `tojson` filter calls it.
//!
//! Differences from minijinja's built-in `tojson` that change bytes: no HTML escaping of
//! `<`, `>`, `&`, `'`; `", "` and `": "` separators; floats printed as Python's `repr`
//! (`1.0`, `1e+16`); non-ASCII kept unless `ensure_ascii`.

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

/// `json.dumps` keyword arguments.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub ensure_ascii: bool,
    pub indent: Option<usize>,
    pub sort_keys: bool,
    /// (item separator, key separator); Python's default depends on `indent`.
    pub separators: Option<(String, String)>,
}

pub(crate) fn dumps(value: &Value, options: &Options) -> Result<String, Error> {
    let (item_sep, key_sep) = options.separators.clone().unwrap_or_else(|| {
        let item = if options.indent.is_some() { "," } else { ", " };
        (item.to_string(), ": ".to_string())
    });
    let mut out = String::new();
    write_value(&mut out, value, options, &item_sep, &key_sep, 0)?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    options: &Options,
    item_sep: &str,
    key_sep: &str,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number(value)),
        ValueKind::String => write_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(
                out,
                '[',
                ']',
                items.len(),
                options,
                item_sep,
                depth,
                |out, i| write_value(out, &items[i], options, item_sep, key_sep, depth + 1),
            )?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort_by_key(key_text);
            }
            write_container(
                out,
                '{',
                '}',
                keys.len(),
                options,
                item_sep,
                depth,
                |out, i| {
                    write_string(out, &key_text(&keys[i]), options.ensure_ascii);
                    out.push_str(key_sep);
                    write_value(
                        out,
                        &value.get_item(&keys[i])?,
                        options,
                        item_sep,
                        key_sep,
                        depth + 1,
                    )
                },
            )?;
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: Object of type {other} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    options: &Options,
    item_sep: &str,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(item_sep);
        }
        if let Some(indent) = options.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * (depth + 1)));
        }
        item(out, i)?;
    }
    if let Some(indent) = options.indent {
        out.push('\n');
        out.push_str(&" ".repeat(indent * depth));
    }
    out.push(close);
    Ok(())
}

/// Python converts keys to strings: `true`, `null`, numbers as JSON would print them.
fn key_text(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number => number(key),
        _ => key.to_string(),
    }
}

fn number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => float_repr(f),
        Err(_) => value.to_string(),
    }
}

/// Python's `float.__repr__`: shortest round-trip digits; exponent form below 1e-4 or
/// from 1e16 on; always a `.0` or exponent so it reads back as a float.
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits: "1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let mantissa = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.6, "123456789012345.6"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (1e300, "1e+300"),
            (100.0, "100.0"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn strings_escape_like_json_dumps() {
        let mut out = String::new();
        write_string(&mut out, "한\"\\\n\u{1}<&>😀", false);
        assert_eq!(out, "\"한\\\"\\\\\\n\\u0001<&>😀\"");
        let mut out = String::new();
        write_string(&mut out, "한😀", true);
        assert_eq!(out, "\"\\ud55c\\ud83d\\ude00\"");
    }

    #[test]
    fn containers_follow_python_separators() {
        let v = Value::from(vec![
            Value::from(1),
            Value::from(vec![Value::from(true)]),
            Value::from(()),
        ]);
        assert_eq!(dumps(&v, &Options::default()).unwrap(), "[1, [true], null]");
        let opts = Options {
            indent: Some(2),
            ..Default::default()
        };
        assert_eq!(
            dumps(&v, &opts).unwrap(),
            "[\n  1,\n  [\n    true\n  ],\n  null\n]"
        );
        let empty = Value::from(Vec::<Value>::new());
        assert_eq!(dumps(&empty, &opts).unwrap(), "[]");
    }
}
