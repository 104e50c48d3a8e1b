//! A test double of the Hugging Face hub on loopback: the few endpoints a model download
//! uses (repo info at a revision, the recursive tree listing, HEAD and GET of
//! `/ORG/NAME/resolve/REV/FILE`), with the headers the real hub sends (`X-Repo-Commit`,
//! `ETag` = git blob SHA-1, or `X-Linked-Etag` = SHA-256 and `X-Linked-Size` for LFS files).
//! Tests stay offline: nothing leaves 127.0.0.1.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// One repo of the fake hub.
#[derive(Clone, Default)]
pub struct FakeRepo {
    pub commit: String,
    /// path -> content.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Paths stored in LFS (etag = SHA-256).
    pub lfs: BTreeSet<String>,
    /// Paths served with different bytes than the etag promises.
    pub corrupt: BTreeSet<String>,
    /// The bearer token the repo needs (a gated model), if any.
    pub token: Option<String>,
}

impl FakeRepo {
    pub fn new(commit_seed: u8) -> Self {
        Self {
            commit: format!("{:02x}", commit_seed).repeat(20),
            ..Default::default()
        }
    }

    pub fn file(mut self, path: &str, bytes: Vec<u8>, lfs: bool) -> Self {
        if lfs {
            self.lfs.insert(path.into());
        }
        self.files.insert(path.into(), bytes);
        self
    }

    fn etag(&self, path: &str) -> String {
        let bytes = &self.files[path];
        if self.lfs.contains(path) {
            hex(&Sha256::digest(bytes))
        } else {
            let mut h = Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(bytes);
            hex(&h.finalize())
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The running double; its address is `endpoint()`.
pub struct FakeHub {
    pub port: u16,
    /// Number of GET requests for file contents, by path.
    pub content_gets: Arc<Mutex<BTreeMap<String, usize>>>,
    pub requests: Arc<AtomicUsize>,
}

impl FakeHub {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn gets(&self, path: &str) -> usize {
        self.content_gets
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Serve `repos` (by `ORG/NAME`) on a free loopback port, on a background thread.
    pub fn start(repos: BTreeMap<String, FakeRepo>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let content_gets = Arc::new(Mutex::new(BTreeMap::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let repos = Arc::new(repos);
        let (g, r) = (content_gets.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (repos, g, r) = (repos.clone(), g.clone(), r.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &repos, &g, &r);
                });
            }
        });
        FakeHub {
            port,
            content_gets,
            requests,
        }
    }
}

struct Request {
    method: String,
    path: String,
    auth: Option<String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut auth = None;
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_string()),
                "content-length" => content_length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).ok()?;
    Some(Request { method, path, auth })
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(out.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

fn json_headers() -> Vec<(String, String)> {
    vec![("Content-Type".into(), "application/json".into())]
}

fn serve(
    stream: TcpStream,
    repos: &BTreeMap<String, FakeRepo>,
    gets: &Mutex<BTreeMap<String, usize>>,
    requests: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    let Some(req) = read_request(&mut reader) else {
        return Ok(());
    };
    requests.fetch_add(1, Ordering::SeqCst);
    let path = req.path.split('?').next().unwrap_or("").to_string();
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| s.replace("%2F", "/"))
        .collect();
    let head = req.method == "HEAD";
    let not_found = |stream: &mut TcpStream, what: &str| {
        let mut h = json_headers();
        h.push(("X-Error-Code".into(), what.into()));
        respond(
            stream,
            "404 Not Found",
            &h,
            format!("{{\"error\":\"{what}\"}}").as_bytes(),
            head,
        )
    };
    // Which repo, and is the caller allowed?
    let (repo_id, rest): (String, Vec<String>) = if segs.first().map(|s| s.as_str()) == Some("api")
    {
        if segs.len() < 4 || segs[1] != "models" {
            return not_found(&mut stream, "RepoNotFound");
        }
        (format!("{}/{}", segs[2], segs[3]), segs[4..].to_vec())
    } else {
        if segs.len() < 2 {
            return not_found(&mut stream, "RepoNotFound");
        }
        (format!("{}/{}", segs[0], segs[1]), segs[2..].to_vec())
    };
    let Some(repo) = repos.get(&repo_id) else {
        return not_found(&mut stream, "RepoNotFound");
    };
    if let Some(token) = &repo.token {
        if req.auth.as_deref() != Some(&format!("Bearer {token}")) {
            let mut h = json_headers();
            h.push(("X-Error-Code".into(), "GatedRepo".into()));
            return respond(
                &mut stream,
                "401 Unauthorized",
                &h,
                b"{\"error\":\"Access to this model is restricted\"}",
                head,
            );
        }
    }
    if segs[0] == "api" {
        match rest.first().map(|s| s.as_str()) {
            Some("revision") => {
                let body = serde_json::json!({"id": repo_id, "_id": "x", "sha": repo.commit});
                respond(
                    &mut stream,
                    "200 OK",
                    &json_headers(),
                    body.to_string().as_bytes(),
                    head,
                )
            }
            Some("tree") => {
                let entries: Vec<serde_json::Value> = repo
                    .files
                    .iter()
                    .map(|(p, b)| {
                        let mut e = serde_json::json!({"type": "file", "oid": repo.etag(p),
                            "size": b.len(), "path": p});
                        if repo.lfs.contains(p) {
                            e["lfs"] = serde_json::json!({"oid": repo.etag(p), "size": b.len(),
                                "pointerSize": 134});
                        }
                        e
                    })
                    .collect();
                let body = serde_json::Value::Array(entries).to_string();
                respond(
                    &mut stream,
                    "200 OK",
                    &json_headers(),
                    body.as_bytes(),
                    head,
                )
            }
            _ => not_found(&mut stream, "EntryNotFound"),
        }
    } else if rest.first().map(|s| s.as_str()) == Some("resolve") && rest.len() >= 3 {
        let file = rest[2..].join("/");
        let Some(bytes) = repo.files.get(&file) else {
            let mut h = json_headers();
            h.push(("X-Repo-Commit".into(), repo.commit.clone()));
            h.push(("X-Error-Code".into(), "EntryNotFound".into()));
            return respond(&mut stream, "404 Not Found", &h, b"{}", head);
        };
        let etag = repo.etag(&file);
        let mut h = vec![
            ("X-Repo-Commit".to_string(), repo.commit.clone()),
            ("ETag".to_string(), format!("\"{etag}\"")),
        ];
        if repo.lfs.contains(&file) {
            h.push(("X-Linked-Etag".into(), format!("\"{etag}\"")));
            h.push(("X-Linked-Size".into(), bytes.len().to_string()));
        }
        let mut body = bytes.clone();
        if repo.corrupt.contains(&file) && !body.is_empty() {
            body[0] ^= 0xff;
        }
        if !head {
            *gets
                .lock()
                .unwrap()
                .entry(format!("{repo_id}/{file}"))
                .or_default() += 1;
        }
        respond(&mut stream, "200 OK", &h, &body, head)
    } else {
        not_found(&mut stream, "EntryNotFound")
    }
}
