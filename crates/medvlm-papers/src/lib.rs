//! medvlm-papers: the literature catalogue of medvlm.
//!
//! The catalogue is four tab-separated files under the workspace's `data/literature/`,
//! embedded at compile time (see `data/literature/README.md` for their origin and the rules
//! behind every annotation):
//!
//! * `papers.tsv`: the 221 rows of the public literature list that accompanies the review
//!   "Taming Vision-Language Models for Medical Image Analysis: A Comprehensive Review"
//!   (2025): 68 VLMs the field builds on (`model-summary`) and 153 task papers.
//! * `methods_papers.tsv`: the papers of the adaptation methods medvlm implements that the
//!   list does not contain (CoOp, Tip-Adapter, LoRA, ...), section `method`.
//! * `annotations.tsv`: year, venue, adaptation strategy and imaging modality of each
//!   `papers.tsv` row, keyed by its link (by its model name where the link is empty).
//! * `implementations.tsv`: which medvlm command (and doc page) implements a paper, or runs
//!   its task with medvlm's own methods.
//!
//! [`catalogue`] parses and joins them; [`filter`] selects; [`render_table`] prints an
//! aligned text table; [`Paper`] serialises with serde for a JSON form.
//!
//! ```
//! use medvlm_papers::{catalogue, filter, parse_task, render_table, Filter};
//! let papers = catalogue().unwrap();
//! let query = Filter {
//!     task: Some(parse_task("models").unwrap()),
//!     search: vec!["clip".into(), "natural".into()],
//!     ..Filter::default()
//! };
//! let hits = filter(&papers, &query);
//! assert!(hits
//!     .iter()
//!     .any(|p| p.title.as_deref() == Some("Learning Transferable Visual Models From Natural Language Supervision")));
//! let clip = hits.iter().find(|p| p.model.as_deref() == Some("CLIP")).unwrap();
//! assert_eq!((clip.year, clip.venue.as_deref()), (Some(2021), Some("ICML")));
//! assert!(clip.implemented_by.iter().any(|i| i.method() == Some("zero-shot")));
//! println!("{}", render_table(&hits));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

/// The source list: `section, model, title, domain, link`.
pub const PAPERS_TSV: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/literature/papers.tsv"
));
/// Papers of the methods medvlm implements that `papers.tsv` lacks.
pub const METHODS_PAPERS_TSV: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/literature/methods_papers.tsv"
));
/// Year, venue, strategy and modality of the `papers.tsv` rows.
pub const ANNOTATIONS_TSV: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/literature/annotations.tsv"
));
/// Paper -> medvlm command and doc page.
pub const IMPLEMENTATIONS_TSV: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/literature/implementations.tsv"
));

/// Why the embedded catalogue could not be read; every variant names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// A row could not be read or holds a bad value.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// File name under `data/literature/`.
        file: &'static str,
        /// 1-based line number (the header is line 1).
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// An annotation or implementation row names a paper that is not in the catalogue.
    #[error("{file}:{line}: no paper has the key {key:?}")]
    UnknownKey {
        /// File name under `data/literature/`.
        file: &'static str,
        /// 1-based line number.
        line: u64,
        /// The key that matched nothing.
        key: String,
    },
}

/// A task name that [`parse_task`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task {0:?}; expected one of: {names}", names = TASK_NAMES.join(", "))]
pub struct UnknownTask(pub String);

/// A strategy name that [`Strategy::parse`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?}; expected one of: zero-shot, prompt-learning, adapters, fine-tuning, pretraining, architecture")]
pub struct UnknownStrategy(pub String);

/// The section a paper is listed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// `model-summary`: the VLMs the field builds on.
    Models,
    /// `method`: papers of methods medvlm implements (`methods_papers.tsv`).
    Method,
    /// Anomaly Detection.
    AnomalyDetection,
    /// Medical Image Classification.
    Classification,
    /// Medical Image Synthesis.
    Synthesis,
    /// Medical Image-Text Retrieval.
    Retrieval,
    /// Medical Multi-task Learning.
    MultiTask,
    /// Medical Report Generation.
    ReportGeneration,
    /// Medical VQA.
    Vqa,
    /// Other Image Analysis Tasks (detection, registration, super-resolution).
    Other,
    /// Segmentation.
    Segmentation,
}

impl Task {
    /// Every task, in the order of the review's list.
    pub const ALL: [Task; 11] = [
        Task::Models,
        Task::Method,
        Task::AnomalyDetection,
        Task::Classification,
        Task::Synthesis,
        Task::Retrieval,
        Task::MultiTask,
        Task::ReportGeneration,
        Task::Vqa,
        Task::Other,
        Task::Segmentation,
    ];

    /// The task of a `section` value, exactly as the TSV files write it.
    pub fn from_section(section: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.section() == section)
    }

    /// The `section` value of the TSV files.
    pub fn section(self) -> &'static str {
        match self {
            Task::Models => "model-summary",
            Task::Method => "method",
            Task::AnomalyDetection => "Anomaly Detection",
            Task::Classification => "Medical Image Classification",
            Task::Synthesis => "Medical Image Synthesis",
            Task::Retrieval => "Medical Image-Text Retrieval",
            Task::MultiTask => "Medical Multi-task Learning",
            Task::ReportGeneration => "Medical Report Generation",
            Task::Vqa => "Medical VQA",
            Task::Other => "Other Image Analysis Tasks",
            Task::Segmentation => "Segmentation",
        }
    }

    /// A short label for tables.
    pub fn short(self) -> &'static str {
        match self {
            Task::Models => "models",
            Task::Method => "method",
            Task::AnomalyDetection => "anomaly",
            Task::Classification => "classification",
            Task::Synthesis => "synthesis",
            Task::Retrieval => "retrieval",
            Task::MultiTask => "multi-task",
            Task::ReportGeneration => "report",
            Task::Vqa => "vqa",
            Task::Other => "other",
            Task::Segmentation => "segmentation",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.section())
    }
}

/// The names [`parse_task`] accepts (besides the full section names).
pub const TASK_NAMES: &[&str] = &[
    "classification",
    "segmentation",
    "detection",
    "anomaly",
    "registration",
    "super-resolution",
    "synthesis",
    "report",
    "vqa",
    "retrieval",
    "multi-task",
    "other",
    "models",
    "methods",
];

/// A task to filter on: a whole section, or the papers of a section whose title names
/// one of some words (detection, registration and super-resolution papers are listed
/// together under "Other Image Analysis Tasks").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskQuery {
    /// The section.
    pub task: Task,
    /// If not empty, the title must contain one of these (lower-case) words.
    pub title_words: Vec<&'static str>,
}

impl TaskQuery {
    /// Whether `paper` is in this task.
    pub fn matches(&self, paper: &Paper) -> bool {
        if paper.task != self.task {
            return false;
        }
        if self.title_words.is_empty() {
            return true;
        }
        let title = paper.title.as_deref().unwrap_or("").to_lowercase();
        self.title_words.iter().any(|w| title.contains(w))
    }
}

/// Parses a task name: a short name from [`TASK_NAMES`] or a full section name, both
/// case-insensitive. `detection` is the "Other Image Analysis Tasks" papers whose title says
/// detection or grounding, `registration` and `super-resolution` likewise.
pub fn parse_task(name: &str) -> Result<TaskQuery, UnknownTask> {
    let n = name.trim().to_lowercase();
    let whole = |task| TaskQuery {
        task,
        title_words: Vec::new(),
    };
    let q = match n.as_str() {
        "classification" => whole(Task::Classification),
        "segmentation" => whole(Task::Segmentation),
        "anomaly" | "anomaly-detection" => whole(Task::AnomalyDetection),
        "synthesis" | "generation" => whole(Task::Synthesis),
        "report" | "report-generation" | "reports" => whole(Task::ReportGeneration),
        "vqa" => whole(Task::Vqa),
        "retrieval" => whole(Task::Retrieval),
        "multi-task" | "multitask" => whole(Task::MultiTask),
        "other" => whole(Task::Other),
        "models" | "model-summary" => whole(Task::Models),
        "methods" | "method" => whole(Task::Method),
        "detection" => TaskQuery {
            task: Task::Other,
            title_words: vec!["detection", "grounding"],
        },
        "registration" => TaskQuery {
            task: Task::Other,
            title_words: vec!["registration"],
        },
        "super-resolution" | "superresolution" => TaskQuery {
            task: Task::Other,
            title_words: vec!["super-resolution"],
        },
        _ => match Task::ALL
            .into_iter()
            .find(|t| t.section().to_lowercase() == n)
        {
            Some(t) => whole(t),
            None => return Err(UnknownTask(name.to_string())),
        },
    };
    Ok(q)
}

/// The adaptation strategies of the review, plus `architecture` for papers that
/// introduce a general model rather than adapt one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Strategy {
    /// Training-free use of a model through its prompts (hand-written prompts, class
    /// descriptions, in-context examples, evaluations of chat models).
    #[serde(rename = "zero-shot prompting")]
    ZeroShotPrompting,
    /// Learned prompt vectors (CoOp, VPT, prefix tuning, ...); encoders frozen.
    #[serde(rename = "prompt learning")]
    PromptLearning,
    /// Small modules or probes on frozen features (adapters, linear probes, caches).
    #[serde(rename = "adapters/probes")]
    AdaptersProbes,
    /// Encoder or decoder weights updated: full, partial, LoRA, BitFit, RL fine-tuning.
    #[serde(rename = "fine-tuning")]
    FineTuning,
    /// Pretraining (or continued pretraining) on domain data.
    #[serde(rename = "domain-specific pretraining")]
    DomainPretraining,
    /// A general-purpose model, not an adaptation (CLIP, SAM, GPT-4, ...).
    #[serde(rename = "architecture")]
    Architecture,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 6] = [
        Strategy::ZeroShotPrompting,
        Strategy::PromptLearning,
        Strategy::AdaptersProbes,
        Strategy::FineTuning,
        Strategy::DomainPretraining,
        Strategy::Architecture,
    ];

    /// The name the TSV files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::ZeroShotPrompting => "zero-shot prompting",
            Strategy::PromptLearning => "prompt learning",
            Strategy::AdaptersProbes => "adapters/probes",
            Strategy::FineTuning => "fine-tuning",
            Strategy::DomainPretraining => "domain-specific pretraining",
            Strategy::Architecture => "architecture",
        }
    }

    /// Parses the TSV name or a short alias (`zero-shot`, `prompt`, `adapter`, `probe`,
    /// `finetune`, `lora`, `pretraining`, ...), case-insensitive.
    pub fn parse(name: &str) -> Result<Strategy, UnknownStrategy> {
        let n = name.trim().to_lowercase();
        if let Some(s) = Strategy::ALL.into_iter().find(|s| s.as_str() == n) {
            return Ok(s);
        }
        Ok(match n.as_str() {
            "zero-shot" | "zeroshot" | "prompting" => Strategy::ZeroShotPrompting,
            "prompt" | "prompt-learning" | "prompt-tuning" => Strategy::PromptLearning,
            "adapter" | "adapters" | "probe" | "probes" | "adapters-probes" => {
                Strategy::AdaptersProbes
            }
            "finetune" | "fine-tune" | "finetuning" | "lora" | "encoder-fine-tuning" => {
                Strategy::FineTuning
            }
            "pretraining" | "pretrain" | "domain-pretraining" | "domain-specific-pretraining" => {
                Strategy::DomainPretraining
            }
            _ => return Err(UnknownStrategy(name.to_string())),
        })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a medvlm command relates to a paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// medvlm implements the paper's method, loss or model (loads its checkpoint).
    Implements,
    /// medvlm implements a documented variant of it (the note says how it differs).
    Variant,
    /// medvlm runs the paper's task or setting with its own methods, not the paper's.
    SameTask,
}

impl Relation {
    /// The name the TSV file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Implements => "implements",
            Relation::Variant => "variant",
            Relation::SameTask => "same-task",
        }
    }

    fn parse(s: &str) -> Option<Relation> {
        [Relation::Implements, Relation::Variant, Relation::SameTask]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// A medvlm command linked to a paper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Implementation {
    /// The command line, e.g. `medvlm adapt --method coop`.
    pub command: String,
    /// The doc page, relative to the workspace root, e.g. `docs/prompt_learning.md`.
    pub doc: String,
    /// How the command relates to the paper.
    pub relation: Relation,
    /// One line on what exactly is implemented or how it differs.
    pub note: String,
}

impl Implementation {
    /// The subcommand: the word after `medvlm` (`adapt`, `zero-shot`, ...).
    pub fn subcommand(&self) -> Option<&str> {
        let mut words = self.command.split_whitespace();
        match words.next() {
            Some("medvlm") => words.next(),
            _ => None,
        }
    }

    /// The method name given by `--method NAME` (or `--method=NAME`), if any.
    pub fn method(&self) -> Option<&str> {
        let mut words = self.command.split_whitespace();
        while let Some(w) = words.next() {
            if w == "--method" {
                return words.next();
            }
            if let Some(m) = w.strip_prefix("--method=") {
                return Some(m);
            }
        }
        None
    }
}

/// One paper of the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Paper {
    /// The `section` column, verbatim.
    pub section: String,
    /// The task that section stands for.
    pub task: Task,
    /// The model name (`model-summary` and `method` rows).
    pub model: Option<String>,
    /// The title (`None` where the source writes `-`).
    pub title: Option<String>,
    /// `Natural` or `Medical` (`model-summary` and `method` rows).
    pub domain: Option<String>,
    /// The link (`None` for the three source rows without one).
    pub link: Option<String>,
    /// Publication year (of the venue given; of the first arXiv version for arXiv).
    pub year: Option<u16>,
    /// Venue (`arXiv` for preprints).
    pub venue: Option<String>,
    /// Adaptation strategy.
    pub strategy: Option<Strategy>,
    /// Imaging modality, from the title (see `data/literature/README.md`).
    pub modality: Option<String>,
    /// How year, venue, modality and strategy were derived (`annotations.tsv`'s `basis`).
    pub basis: Option<String>,
    /// medvlm commands linked to this paper.
    pub implemented_by: Vec<Implementation>,
}

impl Paper {
    /// The key annotation and implementation rows use: the link, or the model name where
    /// the link is empty.
    pub fn key(&self) -> Option<&str> {
        self.link.as_deref().or(self.model.as_deref())
    }

    /// The title, or the model name where the source has no title.
    pub fn display_title(&self) -> &str {
        self.title
            .as_deref()
            .or(self.model.as_deref())
            .unwrap_or("-")
    }
}

fn opt(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty() && s != "-").then(|| s.to_string())
}

fn reader(text: &str) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .quoting(false)
        .has_headers(true)
        .from_reader(text.as_bytes())
}

/// Reads a TSV file, checking its header, and returns `(line, fields)` per row.
fn rows(
    file: &'static str,
    text: &str,
    header: &[&str],
) -> Result<Vec<(u64, Vec<String>)>, CatalogueError> {
    let mut rdr = reader(text);
    let err = |line: u64, message: String| CatalogueError::Parse {
        file,
        line,
        message,
    };
    let got = rdr
        .headers()
        .map_err(|e| err(1, e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    if got != header {
        return Err(err(1, format!("header is {got:?}, expected {header:?}")));
    }
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            err(line, e.to_string())
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        out.push((line, rec.iter().map(str::to_string).collect()));
    }
    Ok(out)
}

fn parse_year(file: &'static str, line: u64, s: &str) -> Result<Option<u16>, CatalogueError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    match s.trim().parse::<u16>() {
        Ok(y) if (1900..=2100).contains(&y) => Ok(Some(y)),
        _ => Err(CatalogueError::Parse {
            file,
            line,
            message: format!("year {s:?} is not a year"),
        }),
    }
}

fn parse_strategy(
    file: &'static str,
    line: u64,
    s: &str,
) -> Result<Option<Strategy>, CatalogueError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    Strategy::ALL
        .into_iter()
        .find(|x| x.as_str() == s.trim())
        .map(Some)
        .ok_or_else(|| CatalogueError::Parse {
            file,
            line,
            message: format!(
                "strategy {s:?} is not one of {:?}",
                Strategy::ALL.map(Strategy::as_str)
            ),
        })
}

fn task_of(file: &'static str, line: u64, section: &str) -> Result<Task, CatalogueError> {
    Task::from_section(section).ok_or_else(|| CatalogueError::Parse {
        file,
        line,
        message: format!("section {section:?} is not a known task"),
    })
}

/// Parses the embedded catalogue: every `papers.tsv` row (in file order) with its
/// annotation, then every `methods_papers.tsv` row, each with the medvlm commands linked
/// to it. Fails, naming the file and line, on a malformed row, an unknown section,
/// strategy or relation, a duplicate annotation, or an annotation or implementation whose
/// key matches no paper.
pub fn catalogue() -> Result<Vec<Paper>, CatalogueError> {
    parse_catalogue(
        PAPERS_TSV,
        METHODS_PAPERS_TSV,
        ANNOTATIONS_TSV,
        IMPLEMENTATIONS_TSV,
    )
}

/// [`catalogue`] over given file contents (in the layout of the embedded files; errors
/// name the embedded file names).
pub fn parse_catalogue(
    papers_tsv: &str,
    methods_papers_tsv: &str,
    annotations_tsv: &str,
    implementations_tsv: &str,
) -> Result<Vec<Paper>, CatalogueError> {
    let mut papers = Vec::new();
    for (line, f) in rows(
        "papers.tsv",
        papers_tsv,
        &["section", "model", "title", "domain", "link"],
    )? {
        papers.push(Paper {
            task: task_of("papers.tsv", line, &f[0])?,
            section: f[0].clone(),
            model: opt(&f[1]),
            title: opt(&f[2]),
            domain: opt(&f[3]),
            link: opt(&f[4]),
            year: None,
            venue: None,
            strategy: None,
            modality: None,
            basis: None,
            implemented_by: Vec::new(),
        });
    }

    // Annotations of the papers.tsv rows.
    const ANN: &str = "annotations.tsv";
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for (line, f) in rows(
        ANN,
        annotations_tsv,
        &[
            "key", "title", "year", "venue", "strategy", "modality", "basis",
        ],
    )? {
        let key = f[0].trim().to_string();
        if let Some(first) = seen.insert(key.clone(), line) {
            return Err(CatalogueError::Parse {
                file: ANN,
                line,
                message: format!("key {key:?} is annotated twice (first on line {first})"),
            });
        }
        let year = parse_year(ANN, line, &f[2])?;
        let strategy = parse_strategy(ANN, line, &f[4])?;
        let mut matched = false;
        for p in papers.iter_mut().filter(|p| p.key() == Some(key.as_str())) {
            if p.title != opt(&f[1]) {
                return Err(CatalogueError::Parse {
                    file: ANN,
                    line,
                    message: format!(
                        "title {:?} differs from the paper's {:?}",
                        f[1],
                        p.title.as_deref().unwrap_or("-")
                    ),
                });
            }
            p.year = year;
            p.venue = opt(&f[3]);
            p.strategy = strategy;
            p.modality = opt(&f[5]);
            p.basis = opt(&f[6]);
            matched = true;
        }
        if !matched {
            return Err(CatalogueError::UnknownKey {
                file: ANN,
                line,
                key,
            });
        }
    }

    // Papers of the methods medvlm implements.
    const MP: &str = "methods_papers.tsv";
    for (line, f) in rows(
        MP,
        methods_papers_tsv,
        &[
            "section", "model", "title", "domain", "link", "year", "venue", "strategy", "modality",
        ],
    )? {
        papers.push(Paper {
            task: task_of(MP, line, &f[0])?,
            section: f[0].clone(),
            model: opt(&f[1]),
            title: opt(&f[2]),
            domain: opt(&f[3]),
            link: opt(&f[4]),
            year: parse_year(MP, line, &f[5])?,
            venue: opt(&f[6]),
            strategy: parse_strategy(MP, line, &f[7])?,
            modality: opt(&f[8]),
            basis: Some("methods_papers.tsv".to_string()),
            implemented_by: Vec::new(),
        });
    }

    // Commands linked to papers.
    const IM: &str = "implementations.tsv";
    for (line, f) in rows(
        IM,
        implementations_tsv,
        &["key", "command", "doc", "relation", "note"],
    )? {
        let key = f[0].trim().to_string();
        let relation = Relation::parse(f[3].trim()).ok_or_else(|| CatalogueError::Parse {
            file: IM,
            line,
            message: format!(
                "relation {:?} is not implements, variant or same-task",
                f[3]
            ),
        })?;
        let imp = Implementation {
            command: f[1].trim().to_string(),
            doc: f[2].trim().to_string(),
            relation,
            note: f[4].trim().to_string(),
        };
        if imp.subcommand().is_none() {
            return Err(CatalogueError::Parse {
                file: IM,
                line,
                message: format!(
                    "command {:?} does not start with `medvlm SUBCOMMAND`",
                    imp.command
                ),
            });
        }
        let mut matched = false;
        for p in papers.iter_mut().filter(|p| p.key() == Some(key.as_str())) {
            p.implemented_by.push(imp.clone());
            matched = true;
        }
        if !matched {
            return Err(CatalogueError::UnknownKey {
                file: IM,
                line,
                key,
            });
        }
    }
    Ok(papers)
}

/// A selection of papers; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The task (see [`parse_task`]).
    pub task: Option<TaskQuery>,
    /// The adaptation strategy.
    pub strategy: Option<Strategy>,
    /// The modality: case-insensitive, the whole modality or one of its `/`- or
    /// `,`-separated parts (`ct`, `pathology`, `fundus`), or an alias (`cxr`, `x-ray`,
    /// `xray`, `skin`, `histology`, `wsi`, `retina`, `us`, `general`).
    pub modality: Option<String>,
    /// Words that must all occur (case-insensitive) in the title or model name.
    pub search: Vec<String>,
}

fn modality_alias(q: &str) -> &str {
    match q {
        "cxr" | "x-ray" | "xray" | "chest x-ray" | "chest-x-ray" => "chest x-ray",
        "skin" | "dermoscopy" => "dermatology",
        "histology" | "histopathology" | "wsi" => "pathology",
        "retina" | "ophthalmology" | "eye" => "fundus",
        "us" => "ultrasound",
        "general" | "multiple" => "multiple",
        "natural" => "natural images",
        other => other,
    }
}

fn modality_matches(modality: &str, query: &str) -> bool {
    let m = modality.to_lowercase();
    let q = query.trim().to_lowercase();
    let q = modality_alias(&q);
    m == q
        || m.split(['/', ',', ':', '('])
            .map(|part| part.trim().trim_end_matches(')'))
            .any(|part| part == q)
}

/// The papers that match `f`, in catalogue order.
pub fn filter<'a>(papers: &'a [Paper], f: &Filter) -> Vec<&'a Paper> {
    let words: Vec<String> = f
        .search
        .iter()
        .flat_map(|w| w.split_whitespace())
        .map(str::to_lowercase)
        .collect();
    papers
        .iter()
        .filter(|p| f.task.as_ref().is_none_or(|t| t.matches(p)))
        .filter(|p| f.strategy.is_none_or(|s| p.strategy == Some(s)))
        .filter(|p| {
            f.modality.as_deref().is_none_or(|q| {
                p.modality
                    .as_deref()
                    .is_some_and(|m| modality_matches(m, q))
            })
        })
        .filter(|p| {
            let hay = format!(
                "{} {}",
                p.title.as_deref().unwrap_or(""),
                p.model.as_deref().unwrap_or("")
            )
            .to_lowercase();
            words.iter().all(|w| hay.contains(w.as_str()))
        })
        .collect()
}

/// The widest a title gets in [`render_table`]; longer titles end in `...`.
pub const TITLE_WIDTH: usize = 60;

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(3)).collect();
        t.push_str("...");
        t
    }
}

/// An aligned text table, one line per paper: year | venue | task | modality | title
/// (truncated to [`TITLE_WIDTH`] characters) | link. A missing value prints `unknown`
/// (`-` for a missing link).
pub fn render_table(papers: &[&Paper]) -> String {
    const UNKNOWN: &str = "unknown";
    let header = ["year", "venue", "task", "modality", "title", "link"];
    let mut table: Vec<[String; 6]> = vec![header.map(str::to_string)];
    for p in papers {
        table.push([
            p.year.map_or(UNKNOWN.to_string(), |y| y.to_string()),
            p.venue.clone().unwrap_or_else(|| UNKNOWN.to_string()),
            p.task.short().to_string(),
            p.modality.clone().unwrap_or_else(|| UNKNOWN.to_string()),
            truncate(p.display_title(), TITLE_WIDTH),
            p.link.clone().unwrap_or_else(|| "-".to_string()),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str(" | ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Every `--method` name that some paper's implementation links to.
pub fn method_names_linked(papers: &[Paper]) -> BTreeSet<String> {
    papers
        .iter()
        .flat_map(|p| &p.implemented_by)
        .filter_map(|i| i.method().map(str::to_string))
        .collect()
}

/// Every doc page the implementations reference (relative to the workspace root).
pub fn doc_paths(papers: &[Paper]) -> BTreeSet<String> {
    papers
        .iter()
        .flat_map(|p| &p.implemented_by)
        .map(|i| i.doc.clone())
        .collect()
}

/// Every subcommand the implementations name (`adapt`, `zero-shot`, ...).
pub fn subcommands_linked(papers: &[Paper]) -> BTreeSet<String> {
    papers
        .iter()
        .flat_map(|p| &p.implemented_by)
        .filter_map(|i| i.subcommand().map(str::to_string))
        .collect()
}
