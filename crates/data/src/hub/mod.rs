//! Uploading a folder to the Hugging Face Hub through its HTTP commit API.
//!
//! [`push`] creates the repository if needed (and the branch, for a revision other than
//! `main`), asks `preupload` which files go through LFS, uploads those through the LFS batch
//! API (basic transfer: one PUT per object, then verify), and makes one NDJSON commit —
//! the sequence of huggingface_hub's `upload_folder` ([`protocol`] has the bodies).
//!
//! The token travels only in the `authorization` header of Hub API requests (never to
//! the pre-signed LFS upload URLs), and no message, log line or error contains it.

pub mod protocol;
mod token;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use protocol::{FileEntry, RepoType, UploadMode};
pub use token::{Token, TokenSource};

use crate::error::{DataError, Result};

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `user/name` or `org/name`.
    pub repo: String,
    pub repo_type: RepoType,
    pub private: bool,
    pub revision: String,
    /// e.g. `https://huggingface.co` (no trailing slash).
    pub endpoint: String,
    pub message: String,
}

/// A local file and where it goes.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub local: PathBuf,
    pub entry: FileEntry,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq)]
pub struct PushOutcome {
    pub commit_url: Option<String>,
    pub commit_oid: Option<String>,
    pub regular: usize,
    /// LFS files whose bytes were sent.
    pub lfs_uploaded: usize,
    /// LFS files the Hub already had.
    pub lfs_present: usize,
    pub ignored: usize,
}

/// Checks `user/name`: two non-empty parts of letters, digits, `-`, `_`, `.`.
pub fn validate_repo_id(repo: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.contains("..")
    };
    match repo.split_once('/') {
        Some((a, b)) if ok_part(a) && ok_part(b) => Ok(()),
        _ => Err(DataError::Hub(format!(
            "--repo '{repo}': expected NAMESPACE/NAME (letters, digits, - _ .)"
        ))),
    }
}

/// Every file under `folder` (sorted by repo path), skipping `.git/` and `.cache/`
/// like huggingface_hub's `upload_folder`, with sizes, SHA-256 and preupload samples.
pub fn collect_files(folder: &Path) -> Result<Vec<LocalFile>> {
    if !folder.is_dir() {
        return Err(DataError::Hub(format!(
            "{} is not a folder",
            folder.display()
        )));
    }
    let mut paths = Vec::new();
    walk(folder, folder, &mut paths)?;
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(paths.len());
    for (rel, local) in paths {
        let mut file = std::fs::File::open(&local).map_err(|e| DataError::io(&local, e))?;
        let mut hasher = Sha256::new();
        let mut sample = Vec::with_capacity(512);
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| DataError::io(&local, e))?;
            if n == 0 {
                break;
            }
            if sample.len() < 512 {
                let take = (512 - sample.len()).min(n);
                sample.extend_from_slice(&buf[..take]);
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let sha256 = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push(LocalFile {
            local,
            entry: FileEntry {
                path_in_repo: rel,
                size,
                sha256,
                sample,
            },
        });
    }
    if out.is_empty() {
        return Err(DataError::Hub(format!(
            "{} has no files to upload",
            folder.display()
        )));
    }
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if name == ".git" || name == ".cache" {
                continue;
            }
            walk(root, &path, out)?;
        } else if path.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            out.push((rel.join("/"), path));
        }
    }
    Ok(())
}

/// A small blocking HTTP client that never logs the token and reports the server's message.
struct Client {
    agent: ureq::Agent,
    token: Token,
}

impl Client {
    fn new(token: Token) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(600)))
            .build();
        Client {
            agent: config.into(),
            token,
        }
    }

    /// Sends a request; `auth` adds the token. Returns (status, body).
    fn send(
        &self,
        method: &'static str,
        url: &str,
        auth: bool,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let net = |e: ureq::Error| DataError::Hub(format!("{method} {url}: {e}"));
        let mut builder = ureq::http::Request::builder().method(method).uri(url);
        builder = builder.header("user-agent", concat!("prefer/", env!("CARGO_PKG_VERSION")));
        if auth {
            builder = builder.header("authorization", self.token.bearer());
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(body.to_vec())
            .map_err(|e| DataError::Hub(format!("{method} {url}: {e}")))?;
        let mut response = self.agent.run(request).map_err(net)?;
        let status = response.status().as_u16();
        let bytes = response.body_mut().read_to_vec().map_err(net)?;
        Ok((status, bytes))
    }

    /// Sends JSON and expects a 2xx JSON answer (or one of `also_ok`).
    fn json(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&str, &str)],
        body: &Value,
        also_ok: &[u16],
    ) -> Result<(u16, Value)> {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        let (status, bytes) = self.send(method, url, true, &all, body.to_string().as_bytes())?;
        check(method, url, status, &bytes, also_ok)?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, value))
    }
}

/// Turns a non-2xx answer into an error carrying the server's message.
fn check(method: &'static str, url: &str, status: u16, body: &[u8], also_ok: &[u16]) -> Result<()> {
    if (200..300).contains(&status) || also_ok.contains(&status) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(body);
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| text.chars().take(300).collect());
    Err(DataError::HubStatus {
        method,
        url: url.to_string(),
        status,
        message,
    })
}

/// Pushes the files (from [`collect_files`]) as one commit. `progress` receives one line
/// per step for the user.
pub fn push(
    files: &[LocalFile],
    options: &PushOptions,
    token: Token,
    mut progress: impl FnMut(&str),
) -> Result<PushOutcome> {
    validate_repo_id(&options.repo)?;
    // ureq redacts the authorization header in its debug logs, but its protocol layer
    // hex-dumps raw request bytes (token included) at trace level: cap the `log` facade at
    // debug for the rest of this process, whatever PREFER_LOG asks for.
    log::set_max_level(log::max_level().min(log::LevelFilter::Debug));
    let client = Client::new(token);
    let endpoint = options.endpoint.trim_end_matches('/');
    let (repo, kind) = (options.repo.as_str(), options.repo_type);

    // 1. The repository (409: it exists) and, for another revision, the branch.
    let body = protocol::create_repo_body(repo, kind, options.private);
    let (status, _) = client.json(
        "POST",
        &protocol::create_repo_url(endpoint),
        &[],
        &body,
        &[409],
    )?;
    progress(if status == 409 {
        "repository exists"
    } else {
        "repository created"
    });
    if options.revision != "main" {
        let url = protocol::create_branch_url(endpoint, repo, kind, &options.revision);
        client.json("POST", &url, &[], &serde_json::json!({}), &[409])?;
    }

    // 2. Preupload: which files go through LFS.
    let entries: Vec<FileEntry> = files.iter().map(|f| f.entry.clone()).collect();
    let mut modes = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(256) {
        let url = protocol::preupload_url(endpoint, repo, kind, &options.revision);
        let (_, answer) = client.json("POST", &url, &[], &protocol::preupload_body(chunk), &[])?;
        modes.extend(protocol::parse_preupload(&answer, chunk).map_err(DataError::Hub)?);
    }

    // 3. LFS uploads.
    let lfs: Vec<&LocalFile> = files
        .iter()
        .zip(&modes)
        .filter(|(_, (m, ignore))| *m == UploadMode::Lfs && !ignore)
        .map(|(f, _)| f)
        .collect();
    let mut outcome = PushOutcome {
        commit_url: None,
        commit_oid: None,
        regular: 0,
        lfs_uploaded: 0,
        lfs_present: 0,
        ignored: modes.iter().filter(|(_, ignore)| *ignore).count(),
    };
    const LFS_JSON: &str = "application/vnd.git-lfs+json";
    for chunk in lfs.chunks(256) {
        let refs: Vec<&FileEntry> = chunk.iter().map(|f| &f.entry).collect();
        let url = protocol::lfs_batch_url(endpoint, repo, kind);
        let body = protocol::lfs_batch_body(&refs, &options.revision);
        let (status, bytes) = client.send(
            "POST",
            &url,
            true,
            &[("accept", LFS_JSON), ("content-type", LFS_JSON)],
            body.to_string().as_bytes(),
        )?;
        check("POST", &url, status, &bytes, &[])?;
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| DataError::Hub(format!("LFS batch answer: {e}")))?;
        for action in protocol::parse_lfs_batch(&answer).map_err(DataError::Hub)? {
            let Some(file) = chunk.iter().find(|f| f.entry.sha256 == action.oid) else {
                return Err(DataError::Hub(format!(
                    "LFS batch answered for an object we did not send: {}",
                    action.oid
                )));
            };
            let Some((href, headers)) = &action.upload else {
                outcome.lfs_present += 1;
                progress(&format!("{}: already on the Hub", file.entry.path_in_repo));
                continue;
            };
            let bytes = std::fs::read(&file.local).map_err(|e| DataError::io(&file.local, e))?;
            let header_refs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // The upload URL is pre-signed storage: no token goes there.
            let (status, answer) = client.send("PUT", href, false, &header_refs, &bytes)?;
            check("PUT", "the LFS upload URL", status, &answer, &[])?;
            if let Some((verify, _)) = &action.verify {
                let body = protocol::lfs_verify_body(&file.entry);
                let (status, answer) = client.send(
                    "POST",
                    verify,
                    true,
                    &[("accept", LFS_JSON), ("content-type", LFS_JSON)],
                    body.to_string().as_bytes(),
                )?;
                check("POST", verify, status, &answer, &[])?;
            }
            outcome.lfs_uploaded += 1;
            progress(&format!(
                "{}: uploaded ({} bytes, LFS)",
                file.entry.path_in_repo, file.entry.size
            ));
        }
    }

    // 4. The commit.
    let committed: Vec<(&FileEntry, UploadMode)> = files
        .iter()
        .zip(&modes)
        .filter(|(_, (_, ignore))| !ignore)
        .map(|(f, (m, _))| (&f.entry, *m))
        .collect();
    outcome.regular = committed
        .iter()
        .filter(|(_, m)| *m == UploadMode::Regular)
        .count();
    let by_path = |e: &FileEntry| -> Result<Vec<u8>> {
        let local = files
            .iter()
            .find(|f| f.entry.path_in_repo == e.path_in_repo)
            .map(|f| &f.local)
            .ok_or_else(|| DataError::Hub(format!("no local file for {}", e.path_in_repo)))?;
        std::fs::read(local).map_err(|err| DataError::io(local, err))
    };
    let body = protocol::commit_body(&options.message, "", &committed, by_path)?;
    let url = protocol::commit_url(endpoint, repo, kind, &options.revision);
    let (status, bytes) = client.send(
        "POST",
        &url,
        true,
        &[("content-type", "application/x-ndjson")],
        &body,
    )?;
    check("POST", &url, status, &bytes, &[])?;
    let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    outcome.commit_url = answer
        .get("commitUrl")
        .and_then(Value::as_str)
        .map(str::to_string);
    outcome.commit_oid = answer
        .get("commitOid")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_sorted_files_with_hashes_and_skips_git() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join("README.md"), "abc").unwrap();
        std::fs::write(dir.path().join("data/x.parquet"), vec![7u8; 1000]).unwrap();
        std::fs::write(dir.path().join(".git/HEAD"), "x").unwrap();
        let files = collect_files(dir.path()).unwrap();
        let paths: Vec<&str> = files
            .iter()
            .map(|f| f.entry.path_in_repo.as_str())
            .collect();
        assert_eq!(paths, vec!["README.md", "data/x.parquet"]);
        // sha256("abc"), a published test vector.
        assert_eq!(
            files[0].entry.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(files[1].entry.sample.len(), 512);
        assert_eq!(files[1].entry.size, 1000);
    }

    #[test]
    fn repo_ids_are_checked() {
        assert!(validate_repo_id("user/my-data_1.0").is_ok());
        assert!(validate_repo_id("noslash").is_err());
        assert!(validate_repo_id("a/b/c").is_err());
        assert!(validate_repo_id("a/../b").is_err());
    }
}
