//! Writing a phantom dataset to disk: images, masks, low-resolution and moved
//! copies, deformation fields, a share of DICOM / NIfTI copies, and manifests
//! in the medvlm-io format.
//!
//! Layout of the output folder:
//!
//! ```text
//! manifest.jsonl              every study, with its split
//! train.jsonl val.jsonl test.jsonl test_heldout_site.jsonl
//! phantoms.json               generation settings, sites, classes and prompts
//! images/<id>.png             the study image (grey or RGB)
//! masks/<id>_<k>_<label>.png  one mask per finding (255 inside)
//! lowres/<id>.png             image downsampled by the low-resolution factor
//! moved/<id>.png              image warped by the deformation
//! deformation/<id>.npy        float32 [2, H, W]: dx, dy in pixels
//! dicom/<id>.dcm nifti/<id>.nii  grey studies with index % 5 == 0
//! ```
//!
//! Every file is written to a temporary name and renamed, so no half-written
//! file is ever visible under its final name; the manifests come last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use medvlm_io::{BoundingBox, ManifestRecord, QaPair, RegionMask};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::{
    generate_study, modality_of, Modality, PhantomError, Split, Study, StudyOptions, HELD_OUT_SITE,
    SITES,
};

/// Name of the manifest with every study.
pub const MANIFEST_FILE: &str = "manifest.jsonl";

/// Every `DICOM_NIFTI_EVERY`-th study of a grey modality also gets a DICOM
/// and a NIfTI copy.
const DICOM_NIFTI_EVERY: u64 = 5;

/// What to generate and where.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub out: PathBuf,
    pub n: u64,
    pub seed: u64,
    pub modalities: Vec<Modality>,
    pub options: StudyOptions,
    /// Write into an existing non-empty folder (files of the same name are
    /// replaced; nothing else is deleted).
    pub force: bool,
}

impl DatasetConfig {
    /// An upper bound of the bytes the dataset takes on disk: every image, mask, copy and
    /// field uncompressed (PNG only makes them smaller), the DICOM / NIfTI share and about
    /// 2 kB of manifest and report per study. An f64, since `n` may be absurd.
    pub fn estimated_disk_bytes(&self) -> f64 {
        let px = f64::from(self.options.size).powi(2);
        let f = f64::from(self.options.lowres_factor.max(1));
        let image = 3.0 * px;
        let masks = self.options.max_findings as f64 * px;
        let lowres = image / (f * f);
        let registration = if self.options.registration {
            image + 2.0 * 4.0 * px
        } else {
            0.0
        };
        // 16-bit DICOM + float32 NIfTI for one study in DICOM_NIFTI_EVERY.
        let copies = (2.0 + 4.0) * px / DICOM_NIFTI_EVERY as f64;
        self.n as f64 * (image + masks + lowres + registration + copies + 2048.0)
    }
}

/// Counts of what was written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatasetSummary {
    pub studies: u64,
    /// Studies per split, in [`Split::ALL`] order.
    pub per_split: Vec<(Split, u64)>,
    /// Studies per modality.
    pub per_modality: Vec<(Modality, u64)>,
    pub normal_studies: u64,
    pub findings: u64,
    pub dicom_files: u64,
    pub nifti_files: u64,
    pub files: u64,
}

fn io_err(path: &Path, source: std::io::Error) -> PhantomError {
    PhantomError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Temp file + rename, without fsync: thousands of small files would
/// otherwise be bound by disk flushes; the manifests, written last through
/// medvlm-io, are synced.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), PhantomError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| io_err(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, e)
    })
}

/// Encode a grey or RGB u8 image as PNG (fast deflate: generation speed
/// matters more than a few percent of disk).
pub(crate) fn encode_png(
    path: &Path,
    px: &[u8],
    w: u32,
    h: u32,
    ch: u32,
) -> Result<Vec<u8>, PhantomError> {
    let mut buf = Vec::with_capacity(px.len() / 2 + 64);
    let colour = if ch == 1 {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    PngEncoder::new_with_quality(&mut buf, CompressionType::Fast, FilterType::Sub)
        .write_image(px, w, h, colour)
        .map_err(|source| PhantomError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(buf)
}

fn write_png(path: &Path, px: &[u8], w: u32, h: u32, ch: u32) -> Result<(), PhantomError> {
    let bytes = encode_png(path, px, w, h, ch)?;
    write_file(path, &bytes)
}

/// NumPy `.npy` (format 1.0) of little-endian float32 with the given shape.
pub(crate) fn npy_f32(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + header, padded to 64 bytes with a final newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn folder_is_empty(dir: &Path) -> Result<bool, PhantomError> {
    let mut entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    Ok(entries.next().is_none())
}

/// Nominal pixel spacing (mm) of a modality at `size` pixels.
fn pixel_spacing_mm(modality: Modality, size: u32) -> f64 {
    let field_mm = match modality {
        Modality::ChestXray => 350.0,
        Modality::BrainMri => 200.0,
        Modality::Dermoscopy => 20.0,
        Modality::Histology => 0.5,
    };
    field_mm / size as f64
}

fn write_study(dir: &Path, study: &Study) -> Result<(ManifestRecord, u64, bool), PhantomError> {
    let id = &study.id;
    let (w, h, ch) = (study.width, study.height, study.channels);
    let mut files = 0u64;
    let image_rel = format!("images/{id}.png");
    write_png(&dir.join(&image_rel), &study.image, w, h, ch)?;
    files += 1;

    let mut masks = Vec::new();
    let mut boxes = Vec::new();
    let mut finding_info = Vec::new();
    for (k, f) in study.findings.iter().enumerate() {
        let rel = format!("masks/{id}_{k}_{}.png", f.label);
        write_png(&dir.join(&rel), &f.mask, w, h, 1)?;
        files += 1;
        masks.push(RegionMask {
            label: f.label.to_string(),
            path: rel,
        });
        boxes.push(BoundingBox {
            label: f.label.to_string(),
            x0: f.bbox[0] as f32,
            y0: f.bbox[1] as f32,
            x1: f.bbox[2] as f32,
            y1: f.bbox[3] as f32,
        });
        finding_info.push(json!({
            "label": f.label,
            "location": f.location,
            "laterality": f.laterality.name(),
            "size_mm": (f.size_mm * 10.0).round() / 10.0,
            "severity": f.severity.name(),
            "size_class": f.severity.size_class(),
            "hedged": f.hedged,
        }));
    }

    let mut extra: BTreeMap<String, Value> = BTreeMap::new();
    extra.insert("study_id".into(), json!(id));
    extra.insert("modality".into(), json!(study.modality.name()));
    extra.insert("site".into(), json!(SITES[study.site]));
    extra.insert("index".into(), json!(study.index));
    extra.insert("width".into(), json!(w));
    extra.insert("height".into(), json!(h));
    extra.insert("channels".into(), json!(ch));
    extra.insert(
        "pixel_spacing_mm".into(),
        json!(pixel_spacing_mm(study.modality, w)),
    );
    extra.insert("findings".into(), Value::Array(finding_info));
    extra.insert(
        "qa_closed".into(),
        Value::Array(study.qa.iter().map(|q| json!(q.closed)).collect()),
    );

    let lowres_rel = format!("lowres/{id}.png");
    write_png(
        &dir.join(&lowres_rel),
        &study.lowres,
        study.lowres_width,
        study.lowres_height,
        ch,
    )?;
    files += 1;
    extra.insert("lowres".into(), json!(lowres_rel));

    if !study.moved.is_empty() {
        let moved_rel = format!("moved/{id}.png");
        write_png(&dir.join(&moved_rel), &study.moved, w, h, ch)?;
        let field_rel = format!("deformation/{id}.npy");
        write_file(
            &dir.join(&field_rel),
            &npy_f32(&study.deformation, &[2, h as usize, w as usize]),
        )?;
        files += 2;
        extra.insert("moved".into(), json!(moved_rel));
        extra.insert("deformation".into(), json!(field_rel));
    }

    let mut medical_copies = false;
    if ch == 1 && study.index.is_multiple_of(DICOM_NIFTI_EVERY) {
        let spacing = pixel_spacing_mm(study.modality, w);
        let dicom_rel = format!("dicom/{id}.dcm");
        let dicom_path = dir.join(&dicom_rel);
        let meta = medvlm_io::dicom::ScMetadata {
            modality: Some(
                if study.modality == Modality::BrainMri {
                    "MR"
                } else {
                    "DX"
                }
                .to_string(),
            ),
            study_description: Some(format!("medvlm phantom {}", study.modality.display_name())),
            series_description: Some(SITES[study.site].to_string()),
            patient_name: Some(format!("PHANTOM^{id}")),
            patient_id: Some(id.clone()),
            window: Some((127.5, 255.0)),
            pixel_spacing: Some((spacing, spacing)),
            ..Default::default()
        };
        medvlm_io::dicom::write_secondary_capture(
            &dicom_path,
            &study.image,
            h as usize,
            w as usize,
            &meta,
        )
        .map_err(|e| PhantomError::Writer {
            path: dicom_path.clone(),
            message: e.to_string(),
        })?;
        // NIfTI stores x (columns) first: data[x * h + y].
        let nifti_rel = format!("nifti/{id}.nii");
        let nifti_path = dir.join(&nifti_rel);
        let (wu, hu) = (w as usize, h as usize);
        let mut vol = vec![0.0f32; wu * hu];
        for y in 0..hu {
            for x in 0..wu {
                vol[x * hu + y] = study.image[y * wu + x] as f32;
            }
        }
        let affine = medvlm_io::volume::affine_from_spacing([spacing, spacing, 1.0]);
        medvlm_io::volume::write_nifti1(&nifti_path, &vol, &[wu, hu, 1], &affine).map_err(|e| {
            PhantomError::Writer {
                path: nifti_path.clone(),
                message: e.to_string(),
            }
        })?;
        files += 2;
        extra.insert("dicom".into(), json!(dicom_rel));
        extra.insert("nifti".into(), json!(nifti_rel));
        medical_copies = true;
    }

    let record = ManifestRecord {
        image: image_rel,
        split: Some(study.split.name().to_string()),
        label: Some(study.primary_label().to_string()),
        labels: study.labels().into_iter().map(str::to_string).collect(),
        text: Some(study.report.clone()),
        masks,
        boxes,
        qa: study
            .qa
            .iter()
            .map(|q| QaPair {
                question: q.question.clone(),
                answer: q.answer.clone(),
                kind: Some(q.kind.name().to_string()),
            })
            .collect(),
        extra,
    };
    Ok((record, files, medical_copies))
}

/// Generation settings, sites and class prompts, as written to `phantoms.json`.
pub fn dataset_description(config: &DatasetConfig) -> Value {
    let classes: BTreeMap<&str, Value> = config
        .modalities
        .iter()
        .map(|m| {
            (
                m.name(),
                Value::Array(
                    m.class_prompts()
                        .into_iter()
                        .map(|(label, prompt)| json!({"label": label, "prompt": prompt}))
                        .collect(),
                ),
            )
        })
        .collect();
    json!({
        "generator": "medvlm-phantoms",
        "version": env!("CARGO_PKG_VERSION"),
        "seed": config.seed,
        "n": config.n,
        "size": config.options.size,
        "lowres_factor": config.options.lowres_factor,
        "max_findings": config.options.max_findings,
        "normal_fraction": config.options.normal_fraction,
        "modalities": config.modalities.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "sites": SITES,
        "held_out_site": SITES[HELD_OUT_SITE],
        "splits": Split::ALL.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "classes": classes,
        "deformation_convention": "moved[y, x] = image(x + dx[y, x], y + dy[y, x]), bilinear; npy shape [2, H, W] = (dx, dy) in pixels",
    })
}

/// Generate and write a dataset. Errors (before writing anything) on `n = 0`,
/// no modality, a bad size, or, without `force`, an existing non-empty folder or a dataset
/// whose [`DatasetConfig::estimated_disk_bytes`] exceed the free space there.
pub fn write_dataset(config: &DatasetConfig) -> Result<DatasetSummary, PhantomError> {
    write_dataset_with_progress(config, &|_| {})
}

/// [`write_dataset`], calling `on_study(1)` from the worker threads after each study is
/// written (for a progress display).
pub fn write_dataset_with_progress(
    config: &DatasetConfig,
    on_study: &(dyn Fn(u64) + Sync),
) -> Result<DatasetSummary, PhantomError> {
    if config.n == 0 {
        return Err(PhantomError::ZeroStudies);
    }
    if config.modalities.is_empty() {
        return Err(PhantomError::NoModalities);
    }
    config.options.validate()?;
    let dir = &config.out;
    medvlm_io::resources::ensure_disk(
        &format!(
            "the dataset ({} studies of {} px)",
            config.n, config.options.size
        ),
        config.estimated_disk_bytes(),
        dir,
        config.force,
        "pass --force",
    )
    .map_err(|e| PhantomError::TooLarge(e.to_string()))?;
    if dir.exists() {
        if !dir.is_dir() {
            return Err(io_err(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a folder",
                ),
            ));
        }
        if !config.force && !folder_is_empty(dir)? {
            return Err(PhantomError::OutputNotEmpty(dir.clone()));
        }
    }
    for sub in [
        "images",
        "masks",
        "lowres",
        "moved",
        "deformation",
        "dicom",
        "nifti",
    ] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
    }

    let results: Vec<(ManifestRecord, u64, bool, Split, Modality, usize)> = (0..config.n)
        .into_par_iter()
        .map(|i| {
            let modality = modality_of(&config.modalities, i).ok_or(PhantomError::NoModalities)?;
            let study = generate_study(modality, config.seed, i, &config.options);
            let (record, files, med) = write_study(dir, &study)?;
            on_study(1);
            Ok((
                record,
                files,
                med,
                study.split,
                modality,
                study.findings.len(),
            ))
        })
        .collect::<Result<_, PhantomError>>()?;

    let mut summary = DatasetSummary {
        studies: config.n,
        ..Default::default()
    };
    let mut records = Vec::with_capacity(results.len());
    let mut per_split: BTreeMap<Split, u64> = BTreeMap::new();
    let mut per_modality: BTreeMap<Modality, u64> = BTreeMap::new();
    for (record, files, med, split, modality, n_findings) in results {
        summary.files += files;
        if med {
            summary.dicom_files += 1;
            summary.nifti_files += 1;
        }
        summary.findings += n_findings as u64;
        if n_findings == 0 {
            summary.normal_studies += 1;
        }
        *per_split.entry(split).or_default() += 1;
        *per_modality.entry(modality).or_default() += 1;
        records.push(record);
    }
    summary.per_split = Split::ALL
        .iter()
        .map(|s| (*s, per_split.get(s).copied().unwrap_or(0)))
        .collect();
    summary.per_modality = per_modality.into_iter().collect();

    let desc = dataset_description(config);
    let desc_path = dir.join("phantoms.json");
    let text = serde_json::to_string_pretty(&desc).map_err(|e| PhantomError::Writer {
        path: desc_path.clone(),
        message: e.to_string(),
    })?;
    write_file(&desc_path, format!("{text}\n").as_bytes())?;
    let manifest_err = |path: &Path, e: medvlm_io::IoError| PhantomError::Writer {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    for split in Split::ALL {
        let subset: Vec<ManifestRecord> = records
            .iter()
            .filter(|r| r.split.as_deref() == Some(split.name()))
            .cloned()
            .collect();
        let path = dir.join(format!("{}.jsonl", split.name()));
        medvlm_io::write_manifest_jsonl(&path, &subset).map_err(|e| manifest_err(&path, e))?;
    }
    let path = dir.join(MANIFEST_FILE);
    medvlm_io::write_manifest_jsonl(&path, &records).map_err(|e| manifest_err(&path, e))?;
    summary.files += 6;
    Ok(summary)
}
