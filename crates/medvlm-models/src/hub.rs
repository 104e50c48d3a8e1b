//! Getting a model from the Hugging Face hub without Python: `medvlm models pull` and
//! `--model hf:ORG/NAME[@REV]` on first use.
//!
//! Downloads go through hf-hub's own client into the standard hub cache
//! ([`crate::source::hub_cache_dir`]: `models--ORG--NAME/blobs/<etag>` with
//! `snapshots/<commit>/<file>` links and `refs/<revision>`), so huggingface_hub, transformers
//! and open_clip see the same files. What medvlm adds:
//!
//! - **Only the files a model needs**: configs, tokenizer files and one weight format
//!   (safetensors before `pytorch_model.bin`), not the TensorFlow/Flax/ONNX copies many repos
//!   also hold.
//! - **Verification**: every file's size is compared with the hub's listing and its content
//!   with its etag, which the hub sets to the SHA-256 of an LFS file and to the git blob
//!   SHA-1 of any other file; a mismatch is an error naming the file.
//! - **Completion**: what a repo lacks for medvlm is made once, into the snapshot folder: a
//!   `tokenizer.json` converted from `vocab.txt` (BERT WordPiece) or `vocab.json` +
//!   `merges.txt` (CLIP BPE), and, for open_clip repos whose text tower is another hub repo
//!   (BiomedCLIP), that repo's `config.json` and tokenizer under
//!   `<snapshot>/<ORG>/<NAME>/`, where the open_clip loader looks for a local `hf_model_name`.
//! - **Offline mode**: `HF_HUB_OFFLINE=1` (or [`HubOptions::offline`]) never touches the
//!   network; a model that is not cached is then an error naming the cache folder.
//! - **Gated models** (MedSigLIP): the token comes from `HF_TOKEN` or `HF_TOKEN_PATH` (or the
//!   file `huggingface-cli login` writes), read by hf-hub; a refusal says so.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hf_hub::progress::{DownloadEvent, Progress, ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClient, HFClientSync, HFError, RepoTypeModel};
use sha2::Digest;

use crate::error::{ModelError, Result};
use crate::source::{hub_cache_dir, resolve_in_cache};

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub cache (default: [`hub_cache_dir`]).
    pub cache_dir: PathBuf,
    /// The hub's address (default: `$HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// Never use the network (default: `$HF_HUB_OFFLINE` is 1, true, yes or on).
    pub offline: bool,
    /// The access token for gated or private models (default: none here, and hf-hub reads
    /// `$HF_TOKEN`, `$HF_TOKEN_PATH` or the file `huggingface-cli login` writes).
    pub token: Option<String>,
}

impl HubOptions {
    /// Options from the environment, as huggingface_hub reads it.
    pub fn from_env() -> Self {
        Self {
            cache_dir: hub_cache_dir(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            offline: offline_from_env(),
            token: None,
        }
    }
}

/// `HF_HUB_OFFLINE` as huggingface_hub reads it (1/true/yes/on, any case).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| is_truthy(&v))
}

fn is_truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// What a pull reports as it goes; the CLI draws a bar or prints lines from it.
pub trait PullProgress: Send + Sync {
    /// The files to fetch are known (`bytes` is their total size, cached ones included).
    fn start(&self, repo: &str, files: usize, bytes: u64);
    /// `done` of the `total` bytes are in the cache.
    fn bytes(&self, done: u64, total: u64);
    /// One file is downloaded (or was already cached) and verified.
    fn file_done(&self, name: &str, size: u64);
}

/// A [`PullProgress`] that writes one line per fetched file to stderr: what `--model hf:...`
/// uses on first use, where no caller drew a bar.
pub struct LineProgress;

impl PullProgress for LineProgress {
    fn start(&self, repo: &str, files: usize, bytes: u64) {
        eprintln!(
            "downloading hf:{repo} into the hub cache: {files} files, {:.1} MiB",
            bytes as f64 / 1048576.0
        );
    }
    fn bytes(&self, _: u64, _: u64) {}
    fn file_done(&self, name: &str, size: u64) {
        eprintln!("  {name} ({:.1} MiB) verified", size as f64 / 1048576.0);
    }
}

/// A [`PullProgress`] that reports nothing.
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn start(&self, _: &str, _: usize, _: u64) {}
    fn bytes(&self, _: u64, _: u64) {}
    fn file_done(&self, _: &str, _: u64) {}
}

/// One file of a pulled model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PulledFile {
    /// Path inside the repo.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// How the content was checked: `sha256` (LFS files) or `git-sha1` (other files).
    pub check: &'static str,
    /// The verified digest (hex).
    pub digest: String,
}

/// The result of [`pull`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    /// `ORG/NAME`.
    pub repo: String,
    /// The revision asked for (`main` by default).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// The snapshot folder: pass it (or `hf:ORG/NAME`) as `--model`.
    pub snapshot: PathBuf,
    /// The files fetched and verified.
    pub files: Vec<PulledFile>,
    /// Files of the repo medvlm does not need and did not fetch.
    pub skipped: Vec<String>,
    /// Files medvlm made for the snapshot (a converted tokenizer, a text tower's config).
    pub made: Vec<String>,
}

fn hub_error(repo: &str, revision: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Source {
        source_spec: format!("hf:{repo}@{revision}"),
        reason: reason.into(),
    }
}

/// Explain an hf-hub error in the user's terms (gated model, offline machine, missing file).
fn explain(repo: &str, revision: &str, endpoint: &str, e: HFError) -> ModelError {
    let reason = match &e {
        HFError::AuthRequired { .. } | HFError::Forbidden { .. } => format!(
            "the hub refused access ({e}): the model is gated or private; accept its terms on \
             its page at {endpoint}/{repo} and set HF_TOKEN (or HF_TOKEN_PATH) to a token of \
             that account"
        ),
        HFError::RepoNotFound { .. } => format!(
            "no such model on {endpoint} ({e}); gated and private models also answer so \
             without a token (set HF_TOKEN)"
        ),
        HFError::RevisionNotFound { .. } => format!("no revision {revision} ({e})"),
        HFError::Request { .. } => format!(
            "cannot reach {endpoint} ({e}); on a machine without network set HF_HUB_OFFLINE=1 \
             and copy the hub cache from a connected one, or point --model at a local folder"
        ),
        _ => e.to_string(),
    };
    hub_error(repo, revision, reason)
}

/// Files medvlm reads from a model repo (see [`crate::source::EXPECTED_FILES`]).
const SMALL_FILES: &[&str] = &[
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "open_clip_config.json",
];

/// Weight files in order of preference, per layout; the first present is fetched.
const WEIGHTS: &[&[&str]] = &[
    &["model.safetensors", "pytorch_model.bin"],
    &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
];

/// The files of `listing` (path -> size) medvlm needs, and the ones it leaves.
fn select_files(listing: &BTreeMap<String, u64>) -> (Vec<String>, Vec<String>) {
    let mut wanted: Vec<String> = SMALL_FILES
        .iter()
        .filter(|f| listing.contains_key(**f))
        .map(|f| f.to_string())
        .collect();
    for group in WEIGHTS {
        if let Some(w) = group.iter().find(|w| listing.contains_key(**w)) {
            wanted.push(w.to_string());
        }
    }
    let skipped = listing
        .keys()
        .filter(|k| !wanted.contains(k))
        .cloned()
        .collect();
    (wanted, skipped)
}

/// Sums hf-hub's per-file byte deltas into one count for a [`PullProgress`].
struct ByteCounter {
    per_file: Mutex<BTreeMap<String, u64>>,
    base: u64,
    total: u64,
    sink: Arc<dyn PullProgress>,
}

impl ProgressHandler for ByteCounter {
    fn on_progress(&self, event: &ProgressEvent) {
        let done = match event {
            ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                let mut map = self.per_file.lock().unwrap_or_else(|p| p.into_inner());
                for f in files {
                    map.insert(f.filename.clone(), f.bytes_completed);
                }
                map.values().sum::<u64>()
            }
            ProgressEvent::Download(DownloadEvent::AggregateProgress {
                bytes_completed, ..
            }) => *bytes_completed,
            _ => return,
        };
        self.sink.bytes(self.base + done, self.total);
    }
}

/// Download `repo` at `revision` (default `main`) into the hub cache, verify it and complete
/// what medvlm needs; with `opts.offline`, only look it up in the cache.
pub fn pull(
    repo: &str,
    revision: Option<&str>,
    opts: &HubOptions,
    progress: Arc<dyn PullProgress>,
) -> Result<PullReport> {
    let revision = revision.unwrap_or("main").to_string();
    let rev = revision.as_str();
    let (org, name) = repo
        .split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| hub_error(repo, rev, "expected ORG/NAME"))?;
    if opts.offline {
        let snapshot = resolve_in_cache(&opts.cache_dir, repo, Some(rev)).map_err(|e| {
            let why = match e {
                ModelError::Source { reason, .. } => reason,
                other => other.to_string(),
            };
            hub_error(
                repo,
                rev,
                format!("offline (HF_HUB_OFFLINE or --offline) and {why}"),
            )
        })?;
        return Ok(PullReport {
            repo: repo.into(),
            revision: revision.clone(),
            commit: commit_of(&snapshot),
            snapshot,
            files: Vec::new(),
            skipped: Vec::new(),
            made: Vec::new(),
        });
    }
    let mut builder = HFClient::builder().cache_dir(&opts.cache_dir);
    if let Some(e) = &opts.endpoint {
        builder = builder.endpoint(e.clone());
    }
    if let Some(t) = &opts.token {
        builder = builder.token(t.clone());
    }
    let client = builder
        .build()
        .map_err(|e| hub_error(repo, rev, format!("hub client: {e}")))?;
    let endpoint = client.endpoint().trim_end_matches('/').to_string();
    let client = HFClientSync::from_inner(client)
        .map_err(|e| hub_error(repo, rev, format!("hub client: {e}")))?;
    let handle = client.model(org, name);
    let mut report = fetch_repo(&handle, repo, rev, &endpoint, &opts.cache_dir, &progress)?;
    complete_snapshot(&client, &mut report, &endpoint, &progress)?;
    Ok(report)
}

/// The commit a snapshot folder is named by.
fn commit_of(snapshot: &Path) -> String {
    snapshot
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The commit `rev` resolves to, and the repo's files (path -> size) at that commit.
fn commit_and_files(
    handle: &hf_hub::HFRepositorySync<RepoTypeModel>,
    repo: &str,
    rev: &str,
    endpoint: &str,
) -> Result<(String, BTreeMap<String, u64>)> {
    let info = handle
        .info()
        .revision(rev.to_string())
        .send()
        .map_err(|e| explain(repo, rev, endpoint, e))?;
    let commit = info
        .sha
        .filter(|s| !s.is_empty())
        .ok_or_else(|| hub_error(repo, rev, "the hub named no commit for this revision"))?;
    let entries = handle
        .list_tree()
        .revision(commit.clone())
        .recursive(true)
        .send()
        .map_err(|e| explain(repo, rev, endpoint, e))?;
    let listing = entries
        .into_iter()
        .filter_map(|e| match e {
            RepoTreeEntry::File { path, size, .. } => Some((path, size)),
            RepoTreeEntry::Directory { .. } => None,
        })
        .collect();
    Ok((commit, listing))
}

/// Which repo and revision a download is of (for the request and for errors).
struct Revision<'a> {
    repo: &'a str,
    rev: &'a str,
    endpoint: &'a str,
    commit: &'a str,
}

/// Download `file` (listed with `size` bytes) at the commit into the cache and verify it.
fn download_verified(
    handle: &hf_hub::HFRepositorySync<RepoTypeModel>,
    at: &Revision,
    file: &str,
    size: u64,
    progress: Option<Progress>,
) -> Result<(PathBuf, Checked)> {
    let path = handle
        .download_file()
        .filename(file.to_string())
        .revision(at.commit.to_string())
        .maybe_progress(progress)
        .send()
        .map_err(|e| explain(at.repo, at.rev, at.endpoint, e))?;
    let checked = verify_file(&path, size).map_err(|why| {
        hub_error(
            at.repo,
            at.rev,
            format!("{file} ({}): {why}", path.display()),
        )
    })?;
    Ok((path, checked))
}

/// List, select, download and verify the files of one repo.
fn fetch_repo(
    handle: &hf_hub::HFRepositorySync<RepoTypeModel>,
    repo: &str,
    rev: &str,
    endpoint: &str,
    cache_dir: &Path,
    progress: &Arc<dyn PullProgress>,
) -> Result<PullReport> {
    let (commit, listing) = commit_and_files(handle, repo, rev, endpoint)?;
    let (wanted, skipped) = select_files(&listing);
    let has_weights = WEIGHTS
        .iter()
        .flat_map(|g| g.iter())
        .any(|w| wanted.iter().any(|f| f == w));
    let has_config = ["config.json", "open_clip_config.json"]
        .iter()
        .any(|c| listing.contains_key(*c));
    if !has_config {
        return Err(hub_error(
            repo,
            rev,
            format!(
                "neither config.json nor open_clip_config.json in the repo (files: {}); medvlm \
                 loads HF CLIP/SigLIP and open_clip layouts",
                listing.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if !has_weights {
        return Err(hub_error(
            repo,
            rev,
            format!(
                "no weight file medvlm reads in the repo (model.safetensors, pytorch_model.bin, \
                 open_clip_model.safetensors or open_clip_pytorch_model.bin; it has: {})",
                listing.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let total: u64 = wanted.iter().map(|f| listing[f]).sum();
    progress.start(repo, wanted.len(), total);
    let mut files = Vec::new();
    let mut done = 0u64;
    for f in &wanted {
        let counter = ByteCounter {
            per_file: Mutex::new(BTreeMap::new()),
            base: done,
            total,
            sink: progress.clone(),
        };
        let at = Revision {
            repo,
            rev,
            endpoint,
            commit: &commit,
        };
        let (_, checked) =
            download_verified(handle, &at, f, listing[f], Some(Progress::new(counter)))?;
        done += listing[f];
        progress.bytes(done, total);
        progress.file_done(f, listing[f]);
        files.push(checked.named(f));
    }
    let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(&commit);
    // The ref is what `hf:ORG/NAME` (no revision) resolves through later; hf-hub writes it
    // when it downloads, but not when every file was already cached under another ref.
    write_ref(&repo_dir, rev, &commit)
        .map_err(|e| hub_error(repo, rev, format!("writing refs/{rev}: {e}")))?;
    Ok(PullReport {
        repo: repo.into(),
        revision: rev.into(),
        commit,
        snapshot,
        files,
        skipped,
        made: Vec::new(),
    })
}

fn write_ref(repo_dir: &Path, rev: &str, commit: &str) -> std::io::Result<()> {
    if rev == commit {
        return Ok(());
    }
    let path = repo_dir.join("refs").join(rev);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    medvlm_io::atomic::write_atomic(&path, commit.as_bytes()).map_err(std::io::Error::other)
}

/// A verified file before it is named.
struct Checked {
    size: u64,
    check: &'static str,
    digest: String,
}

impl Checked {
    fn named(self, name: &str) -> PulledFile {
        PulledFile {
            name: name.into(),
            size: self.size,
            check: self.check,
            digest: self.digest,
        }
    }
}

/// Check a cached file against the listed size and against its etag, which is the name of
/// the blob the snapshot entry points at: a SHA-256 for LFS files, the git blob SHA-1
/// (`sha1("blob <len>\0" + bytes)`) for the others.
fn verify_file(path: &Path, listed_size: u64) -> std::result::Result<Checked, String> {
    let blob = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    let etag = blob
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let size = std::fs::metadata(&blob).map_err(|e| e.to_string())?.len();
    if size != listed_size {
        return Err(format!(
            "size {size} bytes, but the hub lists {listed_size}; delete the file and pull again"
        ));
    }
    let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let (check, digest) = if is_hex(&etag, 64) {
        ("sha256", hash_file(&blob, sha2::Sha256::new(), None)?)
    } else if is_hex(&etag, 40) {
        let header = format!("blob {size}\0");
        (
            "git-sha1",
            hash_file(&blob, sha1::Sha1::new(), Some(header.as_bytes()))?,
        )
    } else {
        return Err(format!(
            "the hub's etag {etag:?} is neither a SHA-256 nor a git SHA-1, so the content \
             cannot be verified"
        ));
    };
    if digest != etag {
        return Err(format!(
            "content {check} {digest} differs from the hub's {etag}; delete the file and pull \
             again"
        ));
    }
    Ok(Checked {
        size,
        check,
        digest,
    })
}

fn hash_file<D: Digest>(
    path: &Path,
    mut hasher: D,
    prefix: Option<&[u8]>,
) -> std::result::Result<String, String> {
    if let Some(p) = prefix {
        hasher.update(p);
    }
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Make what the snapshot lacks for medvlm: the text tower's files of an open_clip repo that
/// names another hub repo, and a `tokenizer.json`.
fn complete_snapshot(
    client: &HFClientSync,
    report: &mut PullReport,
    endpoint: &str,
    progress: &Arc<dyn PullProgress>,
) -> Result<()> {
    let snap = report.snapshot.clone();
    let open_clip = snap.join("open_clip_config.json");
    if open_clip.is_file() {
        let text =
            std::fs::read_to_string(&open_clip).map_err(|e| ModelError::io(&open_clip, e))?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::config(&open_clip, e))?;
        let text_cfg = &cfg["model_cfg"]["text_cfg"];
        let mut names: Vec<&str> = ["hf_model_name", "hf_tokenizer_name"]
            .iter()
            .filter_map(|k| text_cfg[*k].as_str())
            .collect();
        // The two keys usually name the same repo.
        names.dedup();
        for companion in names {
            let folder = snap.join(companion);
            // A local folder (a self-contained model directory) needs nothing fetched.
            if folder.join("config.json").is_file() || !looks_like_repo_id(companion) {
                continue;
            }
            let (org, name) = companion.split_once('/').unwrap_or(("", companion));
            let handle = client.model(org, name);
            let sub = fetch_companion(&handle, companion, endpoint, progress)?;
            for (file, src) in sub {
                let dest = folder.join(&file);
                copy_atomic(&src, &dest)?;
                report.made.push(format!("{companion}/{file}"));
            }
            ensure_tokenizer(&folder, &mut report.made, companion)?;
        }
    }
    ensure_tokenizer(&snap, &mut report.made, "")
}

/// `ORG/NAME` with no path-like parts (an open_clip `hf_model_name` may be a local folder).
fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\\'))
        && !s.starts_with('/')
}

/// The config and tokenizer files of a text-tower repo, fetched and verified; returns
/// (file name, cached path) pairs.
fn fetch_companion(
    handle: &hf_hub::HFRepositorySync<RepoTypeModel>,
    repo: &str,
    endpoint: &str,
    progress: &Arc<dyn PullProgress>,
) -> Result<Vec<(String, PathBuf)>> {
    let rev = "main";
    let (commit, listing) = commit_and_files(handle, repo, rev, endpoint)?;
    let wanted: Vec<&str> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
    ]
    .into_iter()
    .filter(|f| listing.contains_key(*f))
    .collect();
    if !wanted.contains(&"config.json") {
        return Err(hub_error(
            repo,
            rev,
            "the text tower's repo has no config.json",
        ));
    }
    let mut out = Vec::new();
    for f in wanted {
        let at = Revision {
            repo,
            rev,
            endpoint,
            commit: &commit,
        };
        let (path, _) = download_verified(handle, &at, f, listing[f], None)?;
        progress.file_done(&format!("{repo}/{f}"), listing[f]);
        out.push((f.to_string(), path));
    }
    Ok(out)
}

fn copy_atomic(src: &Path, dest: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| ModelError::io(src, e))?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    medvlm_io::atomic::write_atomic(dest, &bytes).map_err(|e| ModelError::Invalid(e.to_string()))
}

/// Write `<dir>/tokenizer.json` converted from the slow-tokenizer files when it is missing.
fn ensure_tokenizer(dir: &Path, made: &mut Vec<String>, prefix: &str) -> Result<()> {
    let target = dir.join("tokenizer.json");
    if target.is_file() {
        return Ok(());
    }
    let json = if dir.join("vocab.txt").is_file() {
        crate::tokenizer_convert::wordpiece_from_dir(dir)?
    } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
        crate::tokenizer_convert::clip_bpe_from_dir(dir)?
    } else {
        return Ok(());
    };
    medvlm_io::atomic::write_atomic(&target, json.as_bytes())
        .map_err(|e| ModelError::Invalid(e.to_string()))?;
    made.push(if prefix.is_empty() {
        "tokenizer.json".to_string()
    } else {
        format!("{prefix}/tokenizer.json")
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_prefers_safetensors_and_skips_other_frameworks() {
        let listing: BTreeMap<String, u64> = [
            ("config.json", 1),
            ("model.safetensors", 2),
            ("pytorch_model.bin", 3),
            ("tf_model.h5", 4),
            ("flax_model.msgpack", 5),
            ("tokenizer.json", 6),
            ("README.md", 7),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let (wanted, skipped) = select_files(&listing);
        assert_eq!(
            wanted,
            ["config.json", "tokenizer.json", "model.safetensors"]
        );
        assert_eq!(
            skipped,
            [
                "README.md",
                "flax_model.msgpack",
                "pytorch_model.bin",
                "tf_model.h5"
            ]
        );
    }

    #[test]
    fn offline_values_follow_huggingface_hub() {
        for (v, want) in [
            ("1", true),
            ("TRUE", true),
            (" on", true),
            ("Yes", true),
            ("0", false),
            ("", false),
            ("off", false),
        ] {
            assert_eq!(is_truthy(v), want, "{v:?}");
        }
    }

    #[test]
    fn repo_ids_and_local_folders_are_told_apart() {
        assert!(looks_like_repo_id(
            "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
        ));
        assert!(!looks_like_repo_id("./text"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }
}
