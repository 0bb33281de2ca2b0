//! The Hub's commit API, as huggingface_hub's `_commit_api.py` / `lfs.py` speak it — request
//! bodies and URLs only (no I/O), so tests can check them byte for byte.
//!
//! 1. `POST {endpoint}/api/repos/create` `{"name", "organization", "type"?, "visibility"?}`
//!    (409 = exists);
//! 2. `POST {endpoint}/api/{type}s/{repo}/preupload/{revision}`
//!    `{"files": [{"path", "sample": base64(first 512 bytes), "size"}]}` →
//!    `{"files": [{"path", "uploadMode": "lfs"|"regular", "shouldIgnore"}]}`;
//! 3. for LFS files, `POST {endpoint}/{prefix}{repo}.git/info/lfs/objects/batch`
//!    (Accept and Content-Type `application/vnd.git-lfs+json`)
//!    `{"operation": "upload", "transfers": ["basic"], "objects": [{"oid": sha256, "size"}],
//!    "hash_algo": "sha256", "ref": {"name": revision}}` → per object either no `actions`
//!    (already stored) or `actions.upload` (`PUT href` with the bytes) and maybe
//!    `actions.verify` (`POST href` `{"oid", "size"}`);
//! 4. `POST {endpoint}/api/{type}s/{repo}/commit/{revision}` (`application/x-ndjson`): a
//!    header line `{"key": "header", "value": {"summary", "description"}}`, then one line
//!    per file: `{"key": "file", "value": {"content": base64, "path", "encoding": "base64"}}`
//!    or `{"key": "lfsFile", "value": {"path", "algo": "sha256", "oid", "size"}}`.

use base64::Engine;
use serde_json::{Value, json};

/// Kinds of Hub repositories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepoType {
    Model,
    #[default]
    Dataset,
    Space,
}

impl RepoType {
    pub fn from_name(name: &str) -> Option<RepoType> {
        match name {
            "model" => Some(RepoType::Model),
            "dataset" => Some(RepoType::Dataset),
            "space" => Some(RepoType::Space),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
            RepoType::Space => "space",
        }
    }

    /// The prefix of git URLs (models have none).
    fn git_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "",
            RepoType::Dataset => "datasets/",
            RepoType::Space => "spaces/",
        }
    }
}

/// A file to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    /// `/`-separated path inside the repo.
    pub path_in_repo: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the content (the LFS oid).
    pub sha256: String,
    /// The first 512 bytes (the preupload sample).
    pub sample: Vec<u8>,
}

/// How the Hub wants a file sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMode {
    Regular,
    Lfs,
}

/// The part of a URL path huggingface_hub quotes with `quote(revision, safe="")`.
pub fn quote(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn create_repo_url(endpoint: &str) -> String {
    format!("{endpoint}/api/repos/create")
}

pub fn create_repo_body(repo: &str, repo_type: RepoType, private: bool) -> Value {
    let (organization, name) = match repo.split_once('/') {
        Some((org, name)) => (Value::from(org), name),
        None => (Value::Null, repo),
    };
    let mut body = json!({"name": name, "organization": organization});
    // huggingface_hub sends no type for models (its default repo type).
    if repo_type != RepoType::Model {
        body["type"] = Value::from(repo_type.name());
    }
    if private {
        body["visibility"] = Value::from("private");
    }
    body
}

pub fn create_branch_url(endpoint: &str, repo: &str, repo_type: RepoType, branch: &str) -> String {
    format!(
        "{endpoint}/api/{}s/{repo}/branch/{}",
        repo_type.name(),
        quote(branch)
    )
}

pub fn preupload_url(endpoint: &str, repo: &str, repo_type: RepoType, revision: &str) -> String {
    format!(
        "{endpoint}/api/{}s/{repo}/preupload/{}",
        repo_type.name(),
        quote(revision)
    )
}

pub fn preupload_body(files: &[FileEntry]) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    json!({
        "files": files
            .iter()
            .map(|f| json!({"path": f.path_in_repo, "sample": b64.encode(&f.sample), "size": f.size}))
            .collect::<Vec<_>>()
    })
}

/// Parses the preupload answer into (path, mode, should_ignore). Empty files are always
/// regular (S3 refuses empty LFS objects), as huggingface_hub does.
pub fn parse_preupload(
    answer: &Value,
    files: &[FileEntry],
) -> Result<Vec<(UploadMode, bool)>, String> {
    let listed = answer
        .get("files")
        .and_then(Value::as_array)
        .ok_or("preupload answer has no 'files' list")?;
    files
        .iter()
        .map(|f| {
            let entry = listed
                .iter()
                .find(|e| e.get("path").and_then(Value::as_str) == Some(f.path_in_repo.as_str()))
                .ok_or_else(|| format!("preupload answer does not mention {}", f.path_in_repo))?;
            let mode = match entry.get("uploadMode").and_then(Value::as_str) {
                Some("lfs") if f.size > 0 => UploadMode::Lfs,
                Some("lfs") | Some("regular") => UploadMode::Regular,
                other => {
                    return Err(format!(
                        "preupload: unknown uploadMode {other:?} for {}",
                        f.path_in_repo
                    ));
                }
            };
            let ignore = entry
                .get("shouldIgnore")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Ok((mode, ignore))
        })
        .collect()
}

pub fn lfs_batch_url(endpoint: &str, repo: &str, repo_type: RepoType) -> String {
    format!(
        "{endpoint}/{}{repo}.git/info/lfs/objects/batch",
        repo_type.git_prefix()
    )
}

pub fn lfs_batch_body(files: &[&FileEntry], revision: &str) -> Value {
    json!({
        "operation": "upload",
        // Only the single-PUT transfer: multipart needs chunking we do not implement, and the
        // server picks "basic" when offered alone.
        "transfers": ["basic"],
        "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
        "hash_algo": "sha256",
        "ref": {"name": revision},
    })
}

/// An action's URL and the headers to send with it.
pub type Href = (String, Vec<(String, String)>);

/// One LFS object's instructions.
#[derive(Debug, Clone, PartialEq)]
pub struct LfsAction {
    pub oid: String,
    /// `None`: the Hub already has the object.
    pub upload: Option<Href>,
    pub verify: Option<Href>,
}

pub fn parse_lfs_batch(answer: &Value) -> Result<Vec<LfsAction>, String> {
    let objects = answer
        .get("objects")
        .and_then(Value::as_array)
        .ok_or("LFS batch answer has no 'objects' list")?;
    let action = |v: Option<&Value>| -> Result<Option<Href>, String> {
        let Some(v) = v else { return Ok(None) };
        let href = v
            .get("href")
            .and_then(Value::as_str)
            .ok_or("LFS action without href")?
            .to_string();
        let mut headers = Vec::new();
        if let Some(h) = v.get("header").and_then(Value::as_object) {
            for (k, val) in h {
                if k == "chunk_size" {
                    return Err(
                        "the Hub asked for a multipart upload, which prefer does not implement"
                            .into(),
                    );
                }
                headers.push((
                    k.clone(),
                    val.as_str().map_or_else(|| val.to_string(), str::to_string),
                ));
            }
        }
        Ok(Some((href, headers)))
    };
    objects
        .iter()
        .map(|o| {
            let oid = o
                .get("oid")
                .and_then(Value::as_str)
                .ok_or("LFS object without oid")?
                .to_string();
            if let Some(err) = o.get("error") {
                return Err(format!("LFS object {oid}: {err}"));
            }
            let actions = o.get("actions");
            Ok(LfsAction {
                upload: action(actions.and_then(|a| a.get("upload")))?,
                verify: action(actions.and_then(|a| a.get("verify")))?,
                oid,
            })
        })
        .collect()
}

pub fn lfs_verify_body(file: &FileEntry) -> Value {
    json!({"oid": file.sha256, "size": file.size})
}

pub fn commit_url(endpoint: &str, repo: &str, repo_type: RepoType, revision: &str) -> String {
    format!(
        "{endpoint}/api/{}s/{repo}/commit/{}",
        repo_type.name(),
        quote(revision)
    )
}

/// The NDJSON commit body; `content_of` gives a regular file's bytes.
pub fn commit_body<E>(
    summary: &str,
    description: &str,
    files: &[(&FileEntry, UploadMode)],
    mut content_of: impl FnMut(&FileEntry) -> Result<Vec<u8>, E>,
) -> Result<Vec<u8>, E> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut lines =
        vec![json!({"key": "header", "value": {"summary": summary, "description": description}})];
    for (file, mode) in files {
        lines.push(match mode {
            UploadMode::Regular => json!({"key": "file", "value": {
                "content": b64.encode(content_of(file)?), "path": file.path_in_repo, "encoding": "base64"}}),
            UploadMode::Lfs => json!({"key": "lfsFile", "value": {
                "path": file.path_in_repo, "algo": "sha256", "oid": file.sha256, "size": file.size}}),
        });
    }
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, size: u64) -> FileEntry {
        FileEntry {
            path_in_repo: path.into(),
            size,
            sha256: "ab".repeat(32),
            sample: b"PAR1".to_vec(),
        }
    }

    #[test]
    fn urls_follow_huggingface_hub() {
        let e = "http://127.0.0.1:9";
        assert_eq!(
            preupload_url(e, "u/n", RepoType::Dataset, "main"),
            "http://127.0.0.1:9/api/datasets/u/n/preupload/main"
        );
        assert_eq!(
            commit_url(e, "u/n", RepoType::Model, "refs/pr/1"),
            "http://127.0.0.1:9/api/models/u/n/commit/refs%2Fpr%2F1"
        );
        assert_eq!(
            lfs_batch_url(e, "u/n", RepoType::Dataset),
            "http://127.0.0.1:9/datasets/u/n.git/info/lfs/objects/batch"
        );
        assert_eq!(
            lfs_batch_url(e, "u/n", RepoType::Model),
            "http://127.0.0.1:9/u/n.git/info/lfs/objects/batch"
        );
    }

    #[test]
    fn bodies_have_the_documented_shape() {
        let f = entry("data/train-00000-of-00001.parquet", 10);
        assert_eq!(
            preupload_body(std::slice::from_ref(&f)),
            json!({"files": [{"path": "data/train-00000-of-00001.parquet", "sample": "UEFSMQ==", "size": 10}]})
        );
        assert_eq!(
            create_repo_body("u/n", RepoType::Dataset, true),
            json!({"name": "n", "organization": "u", "type": "dataset", "visibility": "private"})
        );
        let body = lfs_batch_body(&[&f], "main");
        assert_eq!(body["objects"][0]["oid"], Value::from("ab".repeat(32)));
        assert_eq!(body["ref"]["name"], "main");
        let readme = entry("README.md", 3);
        let ndjson = commit_body::<()>(
            "msg",
            "",
            &[(&readme, UploadMode::Regular), (&f, UploadMode::Lfs)],
            |_| Ok(b"abc".to_vec()),
        )
        .unwrap();
        let lines: Vec<Value> = String::from_utf8(ndjson)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            json!({"key": "header", "value": {"summary": "msg", "description": ""}})
        );
        assert_eq!(
            lines[1],
            json!({"key": "file", "value": {"content": "YWJj", "path": "README.md", "encoding": "base64"}})
        );
        assert_eq!(lines[2]["value"]["algo"], "sha256");
        assert_eq!(lines[2]["value"]["size"], 10);
    }

    #[test]
    fn preupload_and_batch_answers_parse() {
        let files = vec![entry("a", 5), entry("b", 0)];
        let answer = json!({"files": [{"path": "a", "uploadMode": "lfs", "shouldIgnore": false}, {"path": "b", "uploadMode": "lfs", "shouldIgnore": true}]});
        assert_eq!(
            parse_preupload(&answer, &files).unwrap(),
            vec![(UploadMode::Lfs, false), (UploadMode::Regular, true)]
        );
        assert!(parse_preupload(&json!({"files": []}), &files).is_err());
        let batch = json!({"objects": [{"oid": "x", "size": 1, "actions": {"upload": {"href": "http://h/u", "header": {"X-A": "1"}}, "verify": {"href": "http://h/v"}}}, {"oid": "y", "size": 1}]});
        let actions = parse_lfs_batch(&batch).unwrap();
        assert_eq!(
            actions[0].upload,
            Some(("http://h/u".into(), vec![("X-A".into(), "1".into())]))
        );
        assert_eq!(actions[1].upload, None);
        let multipart = json!({"objects": [{"oid": "x", "size": 1, "actions": {"upload": {"href": "h", "header": {"chunk_size": "5"}}}}]});
        assert!(
            parse_lfs_batch(&multipart)
                .unwrap_err()
                .contains("multipart")
        );
    }

    #[test]
    fn quote_matches_python_quote_with_no_safe_chars() {
        assert_eq!(quote("main"), "main");
        assert_eq!(quote("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(quote("한 a"), "%ED%95%9C%20a");
    }
}
