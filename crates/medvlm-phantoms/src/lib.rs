//! medvlm-phantoms: deterministic synthetic medical image-text studies with
//! ground truth for every medvlm task.
//!
//! Four modalities ([`Modality`]) are rendered procedurally, each with its own
//! anatomy and appearance: chest radiographs, axial brain MRI slices,
//! dermoscopy photographs and H&E histology patches. Every study carries:
//!
//! * the image (grey or RGB, u8) and its acquisition site ([`SITES`]);
//! * findings ([`Finding`]) with label, location, laterality, size, severity,
//!   a mask and a bounding box, or none (a normal study);
//! * a free-text report with varied phrasing, synonyms, negation and hedging;
//! * question-answer pairs ([`Qa`]) about presence, location, laterality,
//!   count, size, abnormality and modality;
//! * a low-resolution copy (super-resolution) and a copy moved by a known
//!   smooth deformation with its field (registration).
//!
//! Generation is deterministic: a study depends only on `(seed, index)`
//! through its own ChaCha8 stream, so studies can be made in parallel and the
//! result does not depend on the number of threads. See `docs/phantoms.md`
//! for the generative model.
//!
//! ```
//! use medvlm_phantoms::{generate_study, Modality, StudyOptions};
//! let study = generate_study(Modality::ChestXray, 7, 0, &StudyOptions { size: 64, ..Default::default() });
//! assert_eq!(study.image.len(), 64 * 64);
//! assert!(!study.report.is_empty());
//! ```

mod brain;
mod chest;
mod derm;
mod histo;
mod noise;
mod qa;
mod raster;
mod report;
mod site;
pub mod vocab;
mod write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

pub use report::report_prompts;
pub use site::{HELD_OUT_SITE, SITES};
pub use vocab::{FindingVocab, Modality, NORMAL};
pub use write::{
    dataset_description, write_dataset, write_dataset_with_progress, DatasetConfig, DatasetSummary,
    MANIFEST_FILE,
};

/// Errors of phantom generation.
#[derive(Debug, thiserror::Error)]
pub enum PhantomError {
    #[error(
        "unknown modality `{0}`: expected one of chest_xray, brain_mri, dermoscopy, histology"
    )]
    UnknownModality(String),
    #[error("the number of studies must be at least 1, got 0")]
    ZeroStudies,
    #[error(
        "no modality selected: give at least one of chest_xray, brain_mri, dermoscopy, histology"
    )]
    NoModalities,
    #[error("image size {size} px is not supported: expected a multiple of {factor} between 32 and 1024")]
    BadSize { size: u32, factor: u32 },
    #[error("output folder {0} exists and is not empty; choose another folder or pass --force to write into it")]
    OutputNotEmpty(std::path::PathBuf),
    /// The dataset would not fit where it is to be written (the estimate and the free space).
    #[error("{0}")]
    TooLarge(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {path}: {source}")]
    Encode {
        path: std::path::PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("cannot write {path}: {message}")]
    Writer {
        path: std::path::PathBuf,
        message: String,
    },
}

/// Laterality of a finding, in the patient's frame (radiological convention:
/// the patient's right is on the image's left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Laterality {
    Left,
    Right,
    /// Midline or not applicable (cardiomegaly, dermoscopy, histology).
    None,
}

impl Laterality {
    pub fn name(self) -> &'static str {
        match self {
            Laterality::Left => "left",
            Laterality::Right => "right",
            Laterality::None => "none",
        }
    }
}

/// Severity of a finding, from its extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Mild,
    Moderate,
    Severe,
}

impl Severity {
    /// From an extent in `[0, 1]`, in thirds.
    pub(crate) fn from_unit(s: f32) -> Self {
        if s < 1.0 / 3.0 {
            Severity::Mild
        } else if s < 2.0 / 3.0 {
            Severity::Moderate
        } else {
            Severity::Severe
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Severity::Mild => "mild",
            Severity::Moderate => "moderate",
            Severity::Severe => "severe",
        }
    }

    /// The size class of the same extent: small, medium or large.
    pub fn size_class(self) -> &'static str {
        match self {
            Severity::Mild => "small",
            Severity::Moderate => "medium",
            Severity::Severe => "large",
        }
    }
}

/// One finding of a study, with its ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Label from [`Modality::findings`].
    pub label: &'static str,
    /// Anatomical location in words ("right upper zone", "left frontal lobe").
    pub location: String,
    pub laterality: Laterality,
    /// Largest diameter in millimetres (nominal pixel spacing of the modality).
    pub size_mm: f32,
    pub severity: Severity,
    /// Whether the report hedges this finding ("possible ...").
    pub hedged: bool,
    /// Mask, one byte per pixel, 255 inside and 0 outside.
    pub mask: Vec<u8>,
    /// Tight box of the mask, `[x0, y0, x1, y1)` in pixels.
    pub bbox: [u32; 4],
}

/// Question types of the VQA pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QaKind {
    Presence,
    Abnormality,
    Location,
    Laterality,
    Count,
    Size,
    Modality,
}

impl QaKind {
    pub fn name(self) -> &'static str {
        match self {
            QaKind::Presence => "presence",
            QaKind::Abnormality => "abnormality",
            QaKind::Location => "location",
            QaKind::Laterality => "laterality",
            QaKind::Count => "count",
            QaKind::Size => "size",
            QaKind::Modality => "modality",
        }
    }
}

/// One question-answer pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Qa {
    pub question: String,
    pub answer: String,
    pub kind: QaKind,
    /// Closed questions are answered `yes` or `no`.
    pub closed: bool,
    /// The finding label the question is about, if any.
    pub finding: Option<&'static str>,
}

/// Data split of a study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
    /// Test studies of the held-out site ([`HELD_OUT_SITE`]).
    TestHeldoutSite,
}

impl Split {
    pub const ALL: [Split; 4] = [
        Split::Train,
        Split::Val,
        Split::Test,
        Split::TestHeldoutSite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::TestHeldoutSite => "test_heldout_site",
        }
    }
}

/// Options of one study.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyOptions {
    /// Width and height in pixels (default 128); a multiple of `lowres_factor`.
    pub size: u32,
    /// Most findings in one study (default 3; 1 gives single-label studies).
    pub max_findings: usize,
    /// Share of normal studies (default 0.25).
    pub normal_fraction: f32,
    /// Downsampling factor of the low-resolution copy (default 4).
    pub lowres_factor: u32,
    /// Whether to make the deformed copy and its field (default true).
    pub registration: bool,
}

impl Default for StudyOptions {
    fn default() -> Self {
        Self {
            size: 128,
            max_findings: 3,
            normal_fraction: 0.25,
            lowres_factor: 4,
            registration: true,
        }
    }
}

impl StudyOptions {
    /// Check the size against the limits.
    pub fn validate(&self) -> Result<(), PhantomError> {
        let f = self.lowres_factor.max(1);
        if !(32..=1024).contains(&self.size) || !self.size.is_multiple_of(f) {
            return Err(PhantomError::BadSize {
                size: self.size,
                factor: f,
            });
        }
        Ok(())
    }
}

/// One synthetic study with its ground truth.
#[derive(Debug, Clone)]
pub struct Study {
    /// `"{modality}_{index:06}"`.
    pub id: String,
    pub seed: u64,
    pub index: u64,
    pub modality: Modality,
    /// Index into [`SITES`].
    pub site: usize,
    pub split: Split,
    pub width: u32,
    pub height: u32,
    /// 1 (grey) or 3 (RGB, interleaved).
    pub channels: u32,
    /// Row-major pixels, `height * width * channels` bytes.
    pub image: Vec<u8>,
    pub findings: Vec<Finding>,
    pub report: String,
    pub qa: Vec<Qa>,
    pub lowres: Vec<u8>,
    pub lowres_width: u32,
    pub lowres_height: u32,
    /// `image` warped by `deformation` (empty without registration).
    pub moved: Vec<u8>,
    /// Planar `[2, height, width]` f32 displacements in pixels (dx then dy):
    /// `moved[y, x] = image(x + dx[y, x], y + dy[y, x])`, bilinear.
    pub deformation: Vec<f32>,
}

impl Study {
    /// Sorted distinct finding labels, or `["normal"]`.
    pub fn labels(&self) -> Vec<&'static str> {
        let mut l: Vec<&'static str> = self.findings.iter().map(|f| f.label).collect();
        l.sort_unstable();
        l.dedup();
        if l.is_empty() {
            l.push(NORMAL);
        }
        l
    }

    /// One label for multi-class use: the finding with the largest mask, or
    /// `normal`.
    pub fn primary_label(&self) -> &'static str {
        self.findings
            .iter()
            .max_by_key(|f| f.mask.iter().filter(|&&m| m != 0).count())
            .map(|f| f.label)
            .unwrap_or(NORMAL)
    }

    /// The image as an `image` crate buffer.
    pub fn to_dynamic_image(&self) -> image::DynamicImage {
        to_dynamic(&self.image, self.width, self.height, self.channels)
    }
}

pub(crate) fn to_dynamic(px: &[u8], w: u32, h: u32, ch: u32) -> image::DynamicImage {
    if ch == 1 {
        image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w, h, px.to_vec()).unwrap_or_default(),
        )
    } else {
        image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w, h, px.to_vec()).unwrap_or_default(),
        )
    }
}

/// A finding as rendered, before the report decides hedging.
pub(crate) struct Draft {
    pub label: &'static str,
    pub location: String,
    pub laterality: Laterality,
    pub size_mm: f32,
    pub severity: Severity,
    pub mask: Vec<u8>,
}

/// What a modality renderer produces: `[0, 1]` pixels (interleaved) before
/// acquisition nuisance, and the findings with masks.
pub(crate) struct Rendered {
    pub pixels: Vec<f32>,
    pub drafts: Vec<Draft>,
}

fn study_rng(seed: u64, index: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(index);
    rng
}

/// Site and split of study `index` under `seed`: 20% of studies come from the
/// held-out site (split `test_heldout_site`); the others are spread evenly
/// over the remaining sites and split 70 / 15 / 15 into train / val / test.
pub fn site_and_split(seed: u64, index: u64) -> (usize, Split) {
    let mut rng = study_rng(seed, index, 1);
    if rng.random::<f32>() < 0.2 {
        return (HELD_OUT_SITE, Split::TestHeldoutSite);
    }
    let site = rng.random_range(0..HELD_OUT_SITE);
    let u: f32 = rng.random();
    let split = if u < 0.7 {
        Split::Train
    } else if u < 0.85 {
        Split::Val
    } else {
        Split::Test
    };
    (site, split)
}

/// Choose the finding labels of one study: none with probability
/// `normal_fraction`, else one to `max_findings` distinct types (a second one
/// with probability 0.35, a third with 0.15).
pub(crate) fn choose_labels<R: Rng>(
    rng: &mut R,
    modality: Modality,
    opts: &StudyOptions,
) -> Vec<&'static str> {
    if rng.random::<f32>() < opts.normal_fraction {
        return Vec::new();
    }
    let mut pool = modality.findings();
    let mut n = 1;
    if rng.random::<f32>() < 0.35 {
        n += 1;
        if rng.random::<f32>() < 0.15 / 0.35 {
            n += 1;
        }
    }
    let n = n.min(opts.max_findings.max(1)).min(pool.len());
    let mut chosen = Vec::with_capacity(n);
    for _ in 0..n {
        let k = rng.random_range(0..pool.len());
        chosen.push(pool.remove(k));
    }
    chosen
}

/// Every location a finding of `label` can have in a report's impression
/// (histology impressions name none: empty).
pub(crate) fn impression_locations(modality: Modality, label: &str) -> Vec<String> {
    match modality {
        Modality::ChestXray => chest::locations(label),
        Modality::BrainMri => brain::locations(),
        Modality::Dermoscopy => derm::FIELD_POSITIONS
            .iter()
            .map(|p| p.to_string())
            .collect(),
        Modality::Histology => Vec::new(),
    }
}

/// Generate one study in memory. Deterministic in `(modality, seed, index,
/// opts)`; the site and split depend on `(seed, index)` only.
///
/// # Panics
/// Never for sizes accepted by [`StudyOptions::validate`]; other sizes are
/// clamped into its range (and rounded to the low-resolution factor).
pub fn generate_study(modality: Modality, seed: u64, index: u64, opts: &StudyOptions) -> Study {
    let factor = opts.lowres_factor.max(1);
    let size = (opts.size.clamp(32, 1024) / factor * factor).max(factor) as usize;
    let (site, split) = site_and_split(seed, index);
    let mut rng = study_rng(seed, index, 2 + modality as u64);
    let acq = site::Acquisition::sample(&mut rng, site);
    let labels = choose_labels(&mut rng, modality, opts);
    let rendered = match modality {
        Modality::ChestXray => chest::render(&mut rng, size, &labels),
        Modality::BrainMri => brain::render(&mut rng, size, &labels),
        Modality::Dermoscopy => derm::render(&mut rng, size, &labels),
        Modality::Histology => histo::render(&mut rng, size, &labels, &acq),
    };
    let ch = modality.channels();
    let mut pixels = rendered.pixels;
    let image = acq.apply(&mut rng, &mut pixels, size, size, ch);

    // Findings whose mask fell outside the field of view are dropped, so the
    // report, labels and answers only speak of what is visible.
    let mut findings: Vec<Finding> = rendered
        .drafts
        .into_iter()
        .filter_map(|d| {
            let bbox = raster::mask_box(&d.mask, size, size)?;
            let area = d.mask.iter().filter(|&&m| m != 0).count();
            (area >= 3).then_some(Finding {
                label: d.label,
                location: d.location,
                laterality: d.laterality,
                size_mm: d.size_mm,
                severity: d.severity,
                hedged: false,
                mask: d.mask,
                bbox,
            })
        })
        .collect();
    let report = report::write_report(&mut rng, modality, &mut findings);
    let qa = qa::make_qa(&mut rng, modality, &findings);

    let lowres = raster::downsample_area(&image, size, size, ch, factor as usize);
    let (moved, deformation) = if opts.registration {
        let field = raster::random_deformation(&mut rng, size, size, 0.03 * size as f32);
        (raster::warp(&image, size, size, ch, &field), field)
    } else {
        (Vec::new(), Vec::new())
    };
    Study {
        id: format!("{}_{index:06}", modality.name()),
        seed,
        index,
        modality,
        site,
        split,
        width: size as u32,
        height: size as u32,
        channels: ch as u32,
        image,
        findings,
        report,
        qa,
        lowres,
        lowres_width: (size / factor as usize) as u32,
        lowres_height: (size / factor as usize) as u32,
        moved,
        deformation,
    }
}

/// Modality of study `index` when a dataset cycles through `modalities`.
pub fn modality_of(modalities: &[Modality], index: u64) -> Option<Modality> {
    (!modalities.is_empty()).then(|| modalities[(index % modalities.len() as u64) as usize])
}

/// Generate studies `0..n` in parallel (rayon), cycling through `modalities`.
/// The result does not depend on the number of threads.
pub fn generate_studies(
    modalities: &[Modality],
    seed: u64,
    n: u64,
    opts: &StudyOptions,
) -> Result<Vec<Study>, PhantomError> {
    if n == 0 {
        return Err(PhantomError::ZeroStudies);
    }
    if modalities.is_empty() {
        return Err(PhantomError::NoModalities);
    }
    opts.validate()?;
    Ok((0..n)
        .into_par_iter()
        .filter_map(|i| modality_of(modalities, i).map(|m| generate_study(m, seed, i, opts)))
        .collect())
}
