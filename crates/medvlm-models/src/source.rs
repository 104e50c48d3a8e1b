//! Where a model comes from: a local directory, `hf:ORG/NAME[@REVISION]`
//! resolved in the Hugging Face hub cache, or a preset name (see
//! [`crate::presets`]).
//!
//! The hub cache's location follows huggingface_hub: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; a model lives in
//! `models--ORG--NAME/snapshots/<commit>/` where `<commit>` is read from `refs/<revision>`
//! (default `main`). A hub model that is not cached is downloaded on first use
//! ([`crate::hub::pull`]) unless offline (`HF_HUB_OFFLINE=1`); offline, the error names the
//! folder and the files to put there.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::presets::find_preset;

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local model directory.
    Local(PathBuf),
    /// A hub model read from the local cache.
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

/// Files a model directory needs, per layout, for error messages.
pub const EXPECTED_FILES: &str = "config.json + model.safetensors (or pytorch_model.bin) + \
    tokenizer.json + preprocessor_config.json for CLIP/SigLIP; open_clip_config.json + \
    open_clip_pytorch_model.bin (or open_clip_model.safetensors) + tokenizer.json for BiomedCLIP";

impl ModelSource {
    /// Parse `hf:ORG/NAME[@REV]`, an existing path, or a preset name.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(rest) = spec.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, v)) => (r, Some(v.to_string())),
                None => (rest, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2
                || parts
                    .iter()
                    .any(|p| p.is_empty() || *p == "." || *p == "..")
            {
                return Err(ModelError::Source {
                    source_spec: spec.into(),
                    reason: "expected hf:ORG/NAME or hf:ORG/NAME@REVISION".into(),
                });
            }
            return Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision,
            });
        }
        let path = Path::new(spec);
        if path.exists() {
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        if let Some(p) = find_preset(spec) {
            return Ok(ModelSource::Hub {
                repo: p.hub_id.to_string(),
                revision: None,
            });
        }
        Err(ModelError::Source {
            source_spec: spec.into(),
            reason: "no such directory, and not hf:ORG/NAME or a preset name \
                     (see `medvlm models`)"
                .into(),
        })
    }

    /// The local directory holding the model files.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            ModelSource::Local(p) => {
                if p.is_dir() {
                    Ok(p.clone())
                } else {
                    Err(ModelError::Source {
                        source_spec: p.display().to_string(),
                        reason: format!(
                            "not a directory; a model directory holds {EXPECTED_FILES}"
                        ),
                    })
                }
            }
            ModelSource::Hub { repo, revision } => {
                let opts = crate::hub::HubOptions::from_env();
                match resolve_in_cache(&opts.cache_dir, repo, revision.as_deref()) {
                    Ok(dir) => Ok(dir),
                    // Offline, pull only looks in the cache again and says why it failed.
                    Err(_) => {
                        let progress = std::sync::Arc::new(crate::hub::LineProgress);
                        Ok(crate::hub::pull(repo, revision.as_deref(), &opts, progress)?.snapshot)
                    }
                }
            }
        }
    }
}

/// The hub cache directory from the environment (see the module docs).
pub fn hub_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = env("HF_HOME") {
        return p.join("hub");
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return p.join("huggingface").join("hub");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// Find `repo` at `revision` (default `main`) in the hub cache `cache`.
pub fn resolve_in_cache(cache: &Path, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    let spec = format!("hf:{repo}@{rev}");
    let not_cached = |why: String| ModelError::Source {
        source_spec: spec.clone(),
        reason: format!(
            "{why}. Download it once with `medvlm models pull hf:{repo}` (on a connected \
             machine, then copy the hub cache {cache}), or put its files ({EXPECTED_FILES}) \
             in {} or in a local directory of your choice and point --model at it",
            repo_dir.join("snapshots").join("<commit>").display(),
            cache = cache.display(),
        ),
    };
    if !repo_dir.is_dir() {
        return Err(not_cached(format!(
            "not in the hub cache ({} is missing)",
            repo_dir.display()
        )));
    }
    let ref_file = repo_dir.join("refs").join(rev);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(c) => c.trim().to_string(),
        // A revision may be a commit hash with no ref file.
        Err(_) => rev.to_string(),
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if snap.is_dir() {
        Ok(snap)
    } else {
        Err(not_cached(format!(
            "revision {rev} is not cached ({} is missing)",
            snap.display()
        )))
    }
}
