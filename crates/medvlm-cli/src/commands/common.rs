//! Shared flags and glue of `medvlm adapt`, `medvlm predict` and `medvlm bench fewshot`:
//! selecting a labelled task from a manifest, the class prompts and the image features.
//!
//! Task: the records of a manifest, optionally filtered with `--where
//! FIELD=VALUE` (e.g. `modality=chest_xray`), labelled by `--label-field`
//! (`label`, or any string column such as `modality`). Classes are the sorted
//! distinct labels of the training split unless `--classes` gives them (and
//! their order). Records whose label is not a class are not used; their
//! number is printed, never dropped silently.
//!
//! Multi-label tasks (`--label-field labels`): each record carries any subset
//! of findings in its `labels` list. The classes are the sorted distinct
//! labels of the training split except [`medvlm_adapt::task::NORMAL_LABEL`]: `normal` is not a
//! class but the absence of every finding, so a study labelled only `normal`
//! is a negative for every class (an all-zero multi-hot row). Records with
//! an empty `labels` list, or with `normal` together with a finding, are not
//! used (counted and printed); labels outside the classes are ignored for the
//! record that carries them (also counted and printed).
//!
//! Prompts ([`medvlm_adapt::prompts`]) and features ([`medvlm_adapt::features`]: every
//! selected image embedded once, through the content-keyed feature cache) are library calls;
//! this module turns the flags into their inputs and says on stderr what they did.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use medvlm_adapt::feature_cache::CacheStatus;
pub use medvlm_adapt::features::TaskFeatures;
use medvlm_adapt::features::{self, FeatureOptions};
use medvlm_adapt::prompts::{self, PromptSource};
pub use medvlm_adapt::task::{Task, TaskSpec};
use medvlm_eval::conformal::{ConformalConfig, ConformalScore};
use medvlm_models::LoadedModel;

use super::embed::report_skipped;
use super::progress::Progress;

/// Task selection flags shared by `adapt` and `bench fewshot`.
#[derive(clap::Args, Debug, Clone)]
pub struct TaskArgs {
    /// Manifest column holding the class: `label`, or any string column (e.g. `modality`);
    /// `labels` makes a multi-label task (one independent probability per finding;
    /// `normal` is not a class but a negative for every finding).
    #[arg(long, default_value = "label")]
    pub label_field: String,
    /// Only use records whose FIELD equals VALUE (repeatable), e.g. `--where modality=chest_xray`.
    #[arg(long = "where", value_name = "FIELD=VALUE")]
    pub filters: Vec<String>,
    /// Classes in index order, separated by `;` (default: the sorted labels of the train split).
    #[arg(long)]
    pub classes: Option<String>,
    /// Split whose records form the pool the support set is drawn from.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Split used for evaluation (`none` to skip evaluation).
    #[arg(long, default_value = "test")]
    pub test_split: String,
    /// Split used only to calibrate the conformal prediction sets (never for model
    /// selection). When the manifest has none, the train records outside the support
    /// set are used.
    #[arg(long, default_value = "val")]
    pub calib_split: String,
    /// Prompt template(s) for each class (repeatable; several are ensembled); `{}` is
    /// replaced by the class name with `_` turned into spaces.
    #[arg(long, default_value = "a medical image of {}")]
    pub template: Vec<String>,
    /// Multi-label tasks, `zero-shot-pairs` and the adapters built on it (`tip-adapter`,
    /// `tip-adapter-f`, `clip-adapter`): negative prompt template(s) of each label
    /// (repeatable); `{}` is replaced by the label name with `_` turned into spaces.
    #[arg(long, default_value = "a medical image with no {}")]
    pub negative_template: Vec<String>,
    /// JSON file of class prompts or descriptions: {"class": ["text", ...], ...}. Every
    /// class must appear, and no other name; replaces --template.
    #[arg(long, conflicts_with = "phantom_prompts")]
    pub prompts: Option<PathBuf>,
    /// Use the phantom benchmark's class prompts ("a chest radiograph with a pleural
    /// effusion", ...) of the modality selected with `--where modality=NAME`.
    #[arg(long)]
    pub phantom_prompts: bool,
    /// Conformal score of multi-class sets: `aps` (Romano et al. 2020) or `raps`
    /// (Angelopoulos et al. 2021, lambda 0.01, k_reg 1).
    #[arg(long, default_value = "aps", value_parser = ["aps", "raps"])]
    pub conformal_score: String,
    /// Conformal level alpha. Multi-class: miscoverage, target coverage 1 - alpha.
    /// Multi-label: target expected false-negative rate of the label sets (conformal risk
    /// control).
    #[arg(long, default_value_t = 0.1)]
    pub conformal_alpha: f64,
    /// Randomised conformal scores and sets of multi-class tasks (coverage closer to
    /// exactly 1 - alpha; seeded by --seed).
    #[arg(long)]
    pub conformal_randomized: bool,
    /// Feature cache directory (default: `.medvlm-cache` beside the manifest).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Skip unreadable images (counted and listed) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
}

/// Where `--template`, `--prompts` or `--phantom-prompts` say the class prompts come from.
fn prompt_source(args: &TaskArgs) -> anyhow::Result<PromptSource> {
    if args.phantom_prompts {
        let Some(name) = args
            .filters
            .iter()
            .find_map(|f| f.strip_prefix("modality=").map(str::trim))
        else {
            bail!("--phantom-prompts needs the modality: add --where modality=NAME");
        };
        let modality: medvlm_phantoms::Modality = name
            .parse()
            .with_context(|| format!("--where modality={name}"))?;
        return Ok(PromptSource::Table {
            name: format!("--phantom-prompts ({name})"),
            entries: modality
                .class_prompts()
                .into_iter()
                .map(|(c, p)| (c.to_string(), p.to_string()))
                .collect(),
        });
    }
    Ok(match &args.prompts {
        Some(path) => PromptSource::File(path.clone()),
        None => PromptSource::Templates(args.template.clone()),
    })
}

/// The prompts of each class, in class order ([`medvlm_adapt::prompts::class_prompts`]).
pub fn class_prompts(
    class_names: &[String],
    args: &TaskArgs,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    Ok(prompts::class_prompts(class_names, &prompt_source(args)?)?)
}

/// The negative prompts of each label (multi-label [`PROMPT_PAIR_METHODS`]):
/// `--negative-template` filled with the label name.
pub fn negative_prompts(
    class_names: &[String],
    args: &TaskArgs,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    if args.negative_template.is_empty() {
        bail!("give at least one --negative-template, e.g. \"a medical image with no {{}}\"");
    }
    Ok(prompts::fill_templates(
        class_names,
        &args.negative_template,
    ))
}

/// [`medvlm_adapt::features::task_features`] with a progress display, and what it did said
/// on stderr: the cache file and whether it was loaded, computed or recomputed, and the
/// images that could not be read.
pub fn task_features(
    task: &Task,
    model_spec: &str,
    m: &LoadedModel,
    args: &TaskArgs,
    device: &Device,
) -> anyhow::Result<TaskFeatures> {
    let opts = FeatureOptions {
        model_spec: model_spec.to_string(),
        cache_dir: args.cache.clone(),
        batch: args.batch,
        skip_bad: args.skip_bad,
    };
    // Drawn only while images are being embedded (nothing on a cache hit).
    let pb = std::cell::OnceCell::new();
    let result = features::task_features(task, m, &opts, device, &|n| {
        pb.get_or_init(|| Progress::new("embedding", task.rows.len() as u64, "images"))
            .inc(n)
    });
    let feats = match result {
        Ok(f) => {
            if let Some(p) = pb.get() {
                p.finish();
            }
            f
        }
        Err(e) => {
            if let Some(p) = pb.get() {
                p.abandon();
            }
            let hint = (!args.skip_bad).then_some(" (--skip-bad skips unreadable images)");
            return Err(
                anyhow::Error::new(e).context(format!("reading the images{}", hint.unwrap_or("")))
            );
        }
    };
    report_skipped(&feats.skipped);
    let path = feats.cache_path.display();
    match &feats.cache_status {
        CacheStatus::Hit => eprintln!("features: loaded from {path}"),
        CacheStatus::Miss => eprintln!("features: computed, cached in {path}"),
        CacheStatus::Invalidated(why) => {
            eprintln!("features: cache file {path} was invalid ({why}); recomputed")
        }
    }
    if feats.rows.len() < task.rows.len() {
        eprintln!(
            "note: {} of {} image(s) were unreadable and have no features",
            task.rows.len() - feats.rows.len(),
            task.rows.len()
        );
    }
    Ok(feats)
}

/// Reads the task of these arguments from the manifests (the library's
/// [`Task::from_manifests`]) and says on stderr what it left out.
pub fn load_task(paths: &[PathBuf], args: &TaskArgs) -> anyhow::Result<Task> {
    if !(args.conformal_alpha > 0.0 && args.conformal_alpha < 1.0) {
        bail!(
            "--conformal-alpha {}: must be between 0 and 1 (0.1 = 90 % target coverage)",
            args.conformal_alpha
        );
    }
    let task = Task::from_manifests(paths, &args.spec())?;
    for n in &task.notes {
        eprintln!("note: {n}");
    }
    Ok(task)
}

impl TaskArgs {
    /// The task definition of these arguments.
    pub fn spec(&self) -> TaskSpec {
        TaskSpec {
            label_field: self.label_field.clone(),
            filters: self.filters.clone(),
            classes: self.classes.clone(),
            split: self.split.clone(),
        }
    }

    /// The conformal configuration of these flags, seeded by `seed`.
    pub fn conformal(&self, seed: u64) -> ConformalConfig {
        ConformalConfig {
            score: match self.conformal_score.as_str() {
                "raps" => ConformalScore::Raps {
                    lambda: 0.01,
                    k_reg: 1,
                },
                _ => ConformalScore::Aps,
            },
            alpha: self.conformal_alpha,
            randomized: self.conformal_randomized,
            seed,
        }
    }
}

/// Writes bytes atomically, creating the parent folder.
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    medvlm_io::atomic::write_atomic(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Class prompts and, for multi-label tasks, negative prompts (see [`task_prompts`]).
pub type TaskPrompts = (
    Vec<(String, Vec<String>)>,
    Option<Vec<(String, Vec<String>)>>,
);

/// `--support-cv F`: fixed defaults without it, F-fold cross-validation on the support set with
/// it (at least 2 folds).
pub fn hyperparameter_policy(
    support_cv: Option<usize>,
) -> anyhow::Result<medvlm_adapt::fewshot::HyperparameterPolicy> {
    use medvlm_adapt::fewshot::HyperparameterPolicy;
    match support_cv {
        None => Ok(HyperparameterPolicy::Fixed),
        Some(f) if f >= 2 => Ok(HyperparameterPolicy::SupportCv { folds: f }),
        Some(f) => bail!("--support-cv {f}: needs at least 2 folds"),
    }
}

/// The class prompts of a task and, for a multi-label task, the negative prompts of each label;
/// `--mode realistic` is refused on a multi-label task (its sampler draws classes by prior).
pub fn task_prompts(task: &Task, args: &TaskArgs, mode: &str) -> anyhow::Result<TaskPrompts> {
    let multi_label = task.kind == medvlm_adapt::fewshot::TaskKind::MultiLabel;
    if multi_label && mode == "realistic" {
        bail!(
            "--mode realistic draws classes by their prior and is defined for multi-class tasks; \
             multi-label support sets use the greedy multi-label sampler (at least K positives \
             per finding): drop --mode realistic"
        );
    }
    let prompts = class_prompts(&task.class_names, args)?;
    // Multi-label tasks: the prompt-pair methods score them, and cards record them.
    let negatives = if multi_label {
        Some(negative_prompts(&task.class_names, args)?)
    } else {
        None
    };
    Ok((prompts, negatives))
}

impl TaskArgs {
    /// The library's task setup of these flags (`--test-split none`: no test split).
    #[allow(clippy::too_many_arguments)]
    pub fn setup<'a>(
        &self,
        task: &'a Task,
        features: &'a TaskFeatures,
        model: &'a LoadedModel,
        model_spec: &'a str,
        prompts: TaskPrompts,
        seed: u64,
        device: &'a Device,
    ) -> medvlm_adapt::pipeline::TaskSetup<'a> {
        medvlm_adapt::pipeline::TaskSetup {
            task,
            features,
            model,
            model_spec,
            prompts: prompts.0,
            negative_prompts: prompts.1,
            label_field: self.label_field.clone(),
            filters: self.filters.clone(),
            splits: medvlm_adapt::pipeline::Splits {
                train: self.split.clone(),
                test: (self.test_split != "none").then(|| self.test_split.clone()),
                calib: self.calib_split.clone(),
            },
            conformal: self.conformal(seed),
            batch: self.batch,
            device,
        }
    }
}
