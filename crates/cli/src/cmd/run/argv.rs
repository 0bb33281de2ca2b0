//! A stage table as its command's argv, and a clap error about that argv as a message about
//! the table's keys.
//!
//! How a value becomes flags is read off the command's own clap definition (whether the flag
//! takes a value, splits on a delimiter, or is positional), so a new flag on a command works
//! in a pipeline without a change here. A key the command does not know still becomes
//! `--the-key`: clap refuses it with its own message (and its "a similar argument exists"
//! tip), which [`clap_error`] turns into one naming the file, table and key.

use anyhow::{Result, bail};
use clap::error::{ContextKind, ContextValue};

/// The argv (without the program and subcommand words) that `table` means to `command`:
/// positional arguments first, then flags in the order the command declares them, then keys
/// the command does not know (for clap to refuse). `place` ("p.toml [train]") names the
/// table in errors.
pub(super) fn table_to_argv(
    command: &clap::Command,
    table: &toml::Table,
    place: &str,
) -> Result<Vec<String>> {
    let mut argv = Vec::new();
    let mut used = Vec::new();
    let args: Vec<&clap::Arg> = command.get_arguments().collect();
    for arg in args.iter().filter(|a| a.is_positional()) {
        let key = arg.get_id().as_str();
        if let Some(value) = table.get(key) {
            for text in values(value, key, place, arg.get_value_delimiter())? {
                argv.push(text);
            }
            used.push(key.to_string());
        }
    }
    for arg in args.iter().filter(|a| !a.is_positional()) {
        let Some(long) = arg.get_long() else { continue };
        let key = long.replace('-', "_");
        if let Some(value) = table.get(&key) {
            push_flag(&mut argv, long, Some(arg), value, &key, place)?;
            used.push(key);
        }
    }
    for (key, value) in table.iter().filter(|(k, _)| !used.contains(k)) {
        push_flag(&mut argv, &key.replace('_', "-"), None, value, key, place)?;
    }
    Ok(argv)
}

/// `--long` with `value`: a boolean switches a valueless flag on (true) or leaves it out
/// (false); an array repeats the flag, or joins the values on the flag's delimiter.
fn push_flag(
    argv: &mut Vec<String>,
    long: &str,
    arg: Option<&clap::Arg>,
    value: &toml::Value,
    key: &str,
    place: &str,
) -> Result<()> {
    let flag = format!("--{long}");
    let takes_value = arg.is_some_and(|a| a.get_action().takes_values());
    if let (toml::Value::Boolean(on), false) = (value, takes_value) {
        if *on {
            argv.push(flag);
        }
        return Ok(());
    }
    for text in values(value, key, place, arg.and_then(|a| a.get_value_delimiter()))? {
        // A value that looks like a flag (`-1`, `-`) must be attached to its own.
        if text.starts_with('-') {
            argv.push(format!("{flag}={text}"));
        } else {
            argv.push(flag.clone());
            argv.push(text);
        }
    }
    Ok(())
}

/// The command-line values of one key: one per scalar, one per array element, or the
/// elements joined on `delimiter` for a flag that splits its value.
fn values(
    value: &toml::Value,
    key: &str,
    place: &str,
    delimiter: Option<char>,
) -> Result<Vec<String>> {
    let toml::Value::Array(items) = value else {
        return Ok(vec![scalar(value, key, place)?]);
    };
    let texts = items
        .iter()
        .map(|item| scalar(item, key, place))
        .collect::<Result<Vec<_>>>()?;
    match delimiter {
        Some(d) if !texts.is_empty() => {
            if let Some(bad) = texts.iter().find(|t| t.contains(d)) {
                bail!(
                    "{place}: key `{key}`: the value {bad:?} contains '{d}', which this option \
                     splits its values on"
                );
            }
            Ok(vec![texts.join(&d.to_string())])
        }
        _ => Ok(texts),
    }
}

/// A string, number or boolean as command-line text.
fn scalar(value: &toml::Value, key: &str, place: &str) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        // Debug is the shortest text that parses back to the same f64 (1e-5, 0.05, 4096.0).
        toml::Value::Float(f) => format!("{f:?}"),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{place}: key `{key}`: expected a string, number or boolean, or an array of them; \
             found {}",
            other.type_str()
        ),
    })
}

/// `err` (clap's, about an argv built by [`table_to_argv`]) as an error naming the file,
/// table and key: `p.toml [train]: key `max_stepz`: unexpected argument '--max-stepz' found`.
/// clap's usage lines are dropped; its tips are kept.
pub(super) fn clap_error(err: &clap::Error, place: &str) -> anyhow::Error {
    let rendered = err.render().to_string();
    let mut message = rendered
        .trim()
        .strip_prefix("error: ")
        .unwrap_or(rendered.trim());
    for tail in ["\n\nUsage:", "\n\nFor more information"] {
        if let Some(at) = message.find(tail) {
            message = &message[..at];
        }
    }
    let mut keys = Vec::new();
    match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => keys.extend(key_of(s)),
        Some(ContextValue::Strings(list)) => keys.extend(list.iter().filter_map(|s| key_of(s))),
        _ => {}
    }
    match keys.as_slice() {
        [] => anyhow::anyhow!("{place}: {message}"),
        [key] => anyhow::anyhow!("{place}: key `{key}`: {message}"),
        many => anyhow::anyhow!(
            "{place}: keys {}: {message}",
            many.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The table key clap's name of an argument stands for: `--max-tokens <N>` → `max_tokens`,
/// `<FOLDER>` → `folder`.
fn key_of(clap_name: &str) -> Option<String> {
    let word = clap_name.split_whitespace().next()?;
    let word = word.split('=').next()?;
    if let Some(long) = word.strip_prefix("--") {
        return Some(long.replace('-', "_"));
    }
    let inner = word
        .trim_start_matches(['<', '['])
        .trim_end_matches(['>', ']', '.']);
    (!inner.is_empty()).then(|| inner.to_ascii_lowercase())
}

/// `argv` as a line a POSIX shell reads back into the same words, with the value of any
/// `--token` hidden (a Hub token must never be printed).
pub(super) fn command_line(words: &[String]) -> String {
    let mut out = Vec::with_capacity(words.len());
    let mut hide_next = false;
    for word in words {
        if hide_next {
            out.push("'***'".to_string());
            hide_next = false;
        } else if word == "--token" {
            out.push(word.clone());
            hide_next = true;
        } else if word.starts_with("--token=") {
            out.push("--token='***'".to_string());
        } else {
            out.push(shell_quote(word));
        }
    }
    out.join(" ")
}

/// `word` as one shell word: as it is when it needs no quoting, else in single quotes.
pub(super) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// A command with each kind of argument the stage commands use.
    #[derive(Parser, Debug)]
    #[command(name = "t")]
    struct Cli {
        folder: Option<String>,
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long)]
        stop: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        #[arg(long)]
        keep_truncated: bool,
        #[arg(long)]
        add_special_tokens: Option<bool>,
        #[arg(long, allow_negative_numbers = true)]
        top_k: Option<i64>,
        #[arg(long)]
        beta: Option<f64>,
    }

    fn argv(toml_text: &str) -> Result<Vec<String>> {
        let table: toml::Table = toml_text.parse().unwrap();
        table_to_argv(&Cli::command(), &table, "p.toml [t]")
    }

    #[test]
    fn each_value_kind_becomes_the_flags_clap_reads_back() {
        let words = argv(
            "beta = 1e-5\nfolder = \"pairs\"\nmax_tokens = 48\nstop = [\"</s>\", \"###\"]\n\
             targets = [\"q_proj\", \"v_proj\"]\nkeep_truncated = true\n\
             add_special_tokens = false\ntop_k = -1\n",
        )
        .unwrap();
        assert_eq!(
            words,
            [
                "pairs",
                "--max-tokens",
                "48",
                "--stop",
                "</s>",
                "--stop",
                "###",
                "--targets",
                "q_proj,v_proj",
                "--keep-truncated",
                "--add-special-tokens",
                "false",
                "--top-k=-1",
                "--beta",
                "1e-5",
            ]
        );
        let parsed = Cli::try_parse_from(std::iter::once("t".to_string()).chain(words)).unwrap();
        assert_eq!(parsed.folder.as_deref(), Some("pairs"));
        assert_eq!(parsed.max_tokens, Some(48));
        assert_eq!(parsed.stop, ["</s>", "###"]);
        assert_eq!(parsed.targets, ["q_proj", "v_proj"]);
        assert!(parsed.keep_truncated);
        assert_eq!(parsed.add_special_tokens, Some(false));
        assert_eq!(parsed.top_k, Some(-1));
        assert_eq!(parsed.beta, Some(1e-5));
    }

    #[test]
    fn false_leaves_a_switch_out_and_nested_values_are_refused() {
        assert!(argv("keep_truncated = false\n").unwrap().is_empty());
        let err = argv("stop = [[\"a\"]]\n").unwrap_err().to_string();
        assert!(err.contains("p.toml [t]: key `stop`") && err.contains("found array"));
        let err = argv("targets = [\"a,b\"]\n").unwrap_err().to_string();
        assert!(err.contains("contains ','"), "{err}");
    }

    #[test]
    fn clap_errors_name_the_key() {
        let parse_error = |text: &str| {
            let words = argv(text).unwrap();
            let err =
                Cli::try_parse_from(std::iter::once("t".to_string()).chain(words)).unwrap_err();
            clap_error(&err, "p.toml [t]").to_string()
        };
        let unknown = parse_error("max_tokenz = 3\n");
        assert!(
            unknown.starts_with("p.toml [t]: key `max_tokenz`: unexpected argument"),
            "{unknown}"
        );
        assert!(unknown.contains("--max-tokens"), "clap's tip: {unknown}");
        assert!(!unknown.contains("Usage"), "{unknown}");
        let bad = parse_error("max_tokens = \"many\"\n");
        assert!(
            bad.starts_with("p.toml [t]: key `max_tokens`: invalid value 'many'"),
            "{bad}"
        );
    }

    #[test]
    fn command_lines_quote_for_the_shell_and_hide_tokens() {
        let words: Vec<String> = [
            "--stop",
            "</s>",
            "--x",
            "it's",
            "--token",
            "hf_secret",
            "a/b",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            command_line(&words),
            r"--stop '</s>' --x 'it'\''s' --token '***' a/b"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("아래"), "'아래'");
    }
}
