//! `prefer push` against a local fake Hub (127.0.0.1 only) that records every request, so the
//! order, paths, headers and bodies can be checked against huggingface_hub's commit API —
//! and the token searched for in everything prefer prints.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use testkit::{Ran, TempDir, prefer, run};

// Letters only: digit runs such as "56789" turn up in ports, sizes and timings and would be
// taken for a leak by `leaks_token`.
const TOKEN: &str = "hf_SeCrEtToKeNqZxWvUtPoIuYk";

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// How the fake Hub answers.
#[derive(Clone, Default)]
struct Behaviour {
    repo_exists: bool,
    /// oids the Hub already stores (batch answers without actions).
    stored: Vec<String>,
    /// Status and error message for the commit request.
    commit_error: Option<(u16, String)>,
}

struct FakeHub {
    port: u16,
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeHub {
    fn start(behaviour: Behaviour) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = log.clone();
        std::thread::spawn(move || {
            // Bounded: a test run makes a handful of requests; the thread ends with the process.
            for stream in listener.incoming().take(64) {
                let Ok(stream) = stream else { break };
                serve(stream, port, &behaviour, &shared);
            }
        });
        FakeHub { port, log }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}

/// Reads one request, records it, then answers. Recording comes first: once prefer has its
/// last answer it may exit, and the test reads the log at once.
fn serve(
    mut stream: TcpStream,
    port: u16,
    behaviour: &Behaviour,
    log: &Mutex<Vec<Recorded>>,
) -> Option<()> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let req = Recorded {
        method,
        path,
        headers,
        body,
    };
    let (status, answer) = answer(&req, port, behaviour);
    log.lock().unwrap().push(req);
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    stream.write_all(reply.as_bytes()).ok()
}

fn answer(req: &Recorded, port: u16, b: &Behaviour) -> (u16, String) {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let p = req.path.as_str();
    if p == "/api/repos/create" {
        return if b.repo_exists {
            (
                409,
                json!({"error": "You already created this dataset repo"}).to_string(),
            )
        } else {
            (200, json!({"url": "x"}).to_string())
        };
    }
    if p.contains("/branch/") {
        return (200, "{}".into());
    }
    if p.contains("/preupload/") {
        // Like the Hub: parquet files (and anything over 1 kB) go through LFS.
        let files: Vec<Value> = body["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let path = f["path"].as_str().unwrap();
                let lfs = path.ends_with(".parquet") || f["size"].as_u64().unwrap() > 1000;
                json!({"path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false})
            })
            .collect();
        return (200, json!({"files": files}).to_string());
    }
    if p.ends_with(".git/info/lfs/objects/batch") {
        let objects: Vec<Value> = body["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap();
                if b.stored.iter().any(|s| s == oid) {
                    json!({"oid": oid, "size": o["size"]})
                } else {
                    json!({"oid": oid, "size": o["size"], "actions": {
                        "upload": {"href": format!("http://127.0.0.1:{port}/lfs-upload/{oid}")},
                        "verify": {"href": format!("http://127.0.0.1:{port}/lfs-verify"), "header": {"Authorization": "x"}}}})
                }
            })
            .collect();
        return (
            200,
            json!({"transfer": "basic", "objects": objects}).to_string(),
        );
    }
    if p.starts_with("/lfs-upload/") || p == "/lfs-verify" {
        return (200, "{}".into());
    }
    if p.contains("/commit/") {
        if let Some((status, message)) = &b.commit_error {
            return (*status, json!({"error": message}).to_string());
        }
        return (200, json!({"commitUrl": "https://hub.example/datasets/u/n/commit/abc123", "commitOid": "abc123"}).to_string());
    }
    (404, json!({"error": format!("no route {p}")}).to_string())
}

/// A dataset folder like `prefer pairs` writes, and an HF home, in a scratch directory.
struct Folder(TempDir);

impl Folder {
    fn new(name: &str) -> Folder {
        let root = TempDir::new(&format!("push-{name}"));
        std::fs::create_dir_all(root.join("ds/data")).unwrap();
        std::fs::create_dir_all(root.join("home")).unwrap();
        std::fs::write(
            root.join("ds/README.md"),
            "---\nconfigs: []\n---\n# 선호 데이터\n",
        )
        .unwrap();
        let parquet: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(root.join("ds/data/train-00000-of-00001.parquet"), parquet).unwrap();
        Folder(root)
    }
    fn ds(&self) -> PathBuf {
        self.0.join("ds")
    }
    fn home(&self) -> PathBuf {
        self.0.join("home")
    }
}

fn push(folder: &Folder, endpoint: &str, extra: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = prefer!();
    cmd.arg("push")
        .arg(folder.ds())
        .args(["--repo", "u/n", "--endpoint", endpoint])
        .args(extra);
    cmd.env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN_PATH");
    cmd.env("HF_HOME", folder.home()).env("PREFER_LOG", "trace");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// True when any 5-byte piece of the token's secret part appears in the output, as text or
/// as hex (a trace-level hex dump splits the token across lines).
fn leaks_token(printed: &str) -> bool {
    let secret = &TOKEN.as_bytes()[3..];
    let flat: String = printed
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    secret.windows(5).any(|w| {
        let text = String::from_utf8_lossy(w).to_string();
        let hex: String = w.iter().map(|b| format!("{b:02x}")).collect();
        printed.contains(&text) || flat.contains(&hex)
    })
}

/// Independent references: coreutils' sha256sum and base64.
fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn base64_of(path: &Path) -> String {
    let out = Command::new("base64")
        .args(["-w", "0"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn head_base64(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap();
    let tmp = path.with_extension("head");
    std::fs::write(&tmp, &bytes[..n.min(bytes.len())]).unwrap();
    let b = base64_of(&tmp);
    std::fs::remove_file(tmp).unwrap();
    b
}

#[test]
fn push_follows_the_commit_api_and_never_shows_the_token() {
    let hub = FakeHub::start(Behaviour::default());
    let folder = Folder::new("main");
    let printed = push(
        &folder,
        &hub.endpoint(),
        &["--private"],
        &[("HF_TOKEN", TOKEN)],
    )
    .ok()
    .all();
    assert!(!leaks_token(&printed), "token leaked:\n{printed}");
    assert!(
        printed.contains("ureq::run"),
        "PREFER_LOG=trace did log the HTTP exchange (checked for the token)"
    );
    assert!(printed.contains("token from HF_TOKEN"), "{printed}");
    assert!(
        printed.contains("committed: 1 regular, 1 LFS uploaded"),
        "{printed}"
    );

    let reqs = hub.requests();
    let route: Vec<(&str, &str)> = reqs
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let parquet = folder.ds().join("data/train-00000-of-00001.parquet");
    let readme = folder.ds().join("README.md");
    let oid = sha256_hex(&parquet);
    assert_eq!(
        route,
        vec![
            ("POST", "/api/repos/create"),
            ("POST", "/api/datasets/u/n/preupload/main"),
            ("POST", "/datasets/u/n.git/info/lfs/objects/batch"),
            ("PUT", &*format!("/lfs-upload/{oid}")),
            ("POST", "/lfs-verify"),
            ("POST", "/api/datasets/u/n/commit/main"),
        ]
    );
    let bearer = format!("Bearer {TOKEN}");
    for r in &reqs {
        let auth = r.headers.get("authorization");
        if r.method == "PUT" {
            assert_eq!(auth, None, "no token to the storage URL");
        } else {
            assert_eq!(auth, Some(&bearer), "{} {}", r.method, r.path);
        }
    }
    let body = |i: usize| -> Value { serde_json::from_slice(&reqs[i].body).unwrap() };
    assert_eq!(
        body(0),
        json!({"name": "n", "organization": "u", "type": "dataset", "visibility": "private"})
    );
    assert_eq!(
        body(1),
        json!({"files": [
            {"path": "README.md", "sample": base64_of(&readme), "size": std::fs::metadata(&readme).unwrap().len()},
            {"path": "data/train-00000-of-00001.parquet", "sample": head_base64(&parquet, 512), "size": 3000},
        ]})
    );
    assert_eq!(
        reqs[2].headers.get("accept").map(String::as_str),
        Some("application/vnd.git-lfs+json")
    );
    assert_eq!(
        reqs[2].headers.get("content-type").map(String::as_str),
        Some("application/vnd.git-lfs+json")
    );
    assert_eq!(
        body(2),
        json!({"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 3000}], "hash_algo": "sha256", "ref": {"name": "main"}})
    );
    assert_eq!(reqs[3].body, std::fs::read(&parquet).unwrap());
    assert_eq!(body(4), json!({"oid": oid, "size": 3000}));
    assert_eq!(
        reqs[5].headers.get("content-type").map(String::as_str),
        Some("application/x-ndjson")
    );
    let lines: Vec<Value> = String::from_utf8(reqs[5].body.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"key": "header", "value": {"summary": "Upload with prefer", "description": ""}}),
            json!({"key": "file", "value": {"content": base64_of(&readme), "path": "README.md", "encoding": "base64"}}),
            json!({"key": "lfsFile", "value": {"path": "data/train-00000-of-00001.parquet", "algo": "sha256", "oid": oid, "size": 3000}}),
        ]
    );
}

#[test]
fn existing_repo_stored_object_branch_and_token_file() {
    let folder = Folder::new("branch");
    let oid = sha256_hex(&folder.ds().join("data/train-00000-of-00001.parquet"));
    let hub = FakeHub::start(Behaviour {
        repo_exists: true,
        stored: vec![oid.clone()],
        commit_error: None,
    });
    std::fs::write(folder.home().join("token"), format!("{TOKEN}\n")).unwrap();
    let printed = push(
        &folder,
        &hub.endpoint(),
        &["--revision", "refs/pr/1", "--type", "model"],
        &[],
    )
    .ok()
    .all();
    assert!(!leaks_token(&printed), "token leaked:\n{printed}");
    assert!(
        printed.contains("repository exists") && printed.contains("already on the Hub"),
        "{printed}"
    );
    let route: Vec<String> = hub
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        route,
        vec![
            "POST /api/repos/create",
            "POST /api/models/u/n/branch/refs%2Fpr%2F1",
            "POST /api/models/u/n/preupload/refs%2Fpr%2F1",
            "POST /u/n.git/info/lfs/objects/batch",
            "POST /api/models/u/n/commit/refs%2Fpr%2F1",
        ]
    );
    let create: Value = serde_json::from_slice(&hub.requests()[0].body).unwrap();
    assert_eq!(
        create,
        json!({"name": "n", "organization": "u"}),
        "no type for models, no visibility unless --private"
    );
}

#[test]
fn server_errors_and_missing_tokens_are_clear() {
    let hub = FakeHub::start(Behaviour {
        commit_error: Some((403, "You don't have the rights".into())),
        ..Default::default()
    });
    let folder = Folder::new("errors");
    let printed = push(&folder, &hub.endpoint(), &["--token", TOKEN], &[])
        .failed()
        .all();
    assert!(
        printed.contains("HTTP 403: You don't have the rights"),
        "{printed}"
    );
    assert!(!leaks_token(&printed), "token leaked:\n{printed}");

    let printed = push(&folder, &hub.endpoint(), &[], &[]).failed().all();
    assert!(
        printed.contains("no token: pass --token, set HF_TOKEN"),
        "{printed}"
    );
}

#[test]
fn dry_run_sends_nothing() {
    let hub = FakeHub::start(Behaviour::default());
    let folder = Folder::new("dry");
    let printed = push(
        &folder,
        &hub.endpoint(),
        &["--dry-run"],
        &[("HF_TOKEN", TOKEN)],
    )
    .ok()
    .all();
    assert!(
        printed.contains("would upload 2 files")
            && printed.contains("data/train-00000-of-00001.parquet  3000 bytes"),
        "{printed}"
    );
    assert!(!leaks_token(&printed));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(hub.requests().is_empty());
}
