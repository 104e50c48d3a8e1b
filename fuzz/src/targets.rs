//! The fuzz targets: which public medvlm entry point each one drives, where
//! its seeds come from, and how an input is written to disk for path-based APIs.

use std::path::{Path, PathBuf};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::mutate;

/// A fuzz target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `medvlm_io::dicom::read_dicom` (via `load_any`) and `MedImage::plane`.
    Dicom,
    /// `medvlm_io::volume::read_nifti` (`.nii` and `.nii.gz`) and `MedImage::plane`.
    Nifti,
    /// `.npy` through `load_any` and `npy::decode_npy`; `.npz` through `medmnist::read_medmnist`.
    Npy,
    /// `medvlm_io::read_manifest` on a `.jsonl` file.
    ManifestJsonl,
    /// `medvlm_io::read_manifest` on a `.csv` file.
    ManifestCsv,
    /// `TrainConfig::from_toml_str` and `validate` for both commands.
    TrainConfig,
    /// `medvlm_models::weights::WeightFile::open` on a PyTorch `.bin`, then tensor reads.
    Pickle,
}

/// Every target, in the order `all` runs them.
pub const ALL: &[Target] = &[
    Target::Dicom,
    Target::Nifti,
    Target::Npy,
    Target::ManifestJsonl,
    Target::ManifestCsv,
    Target::TrainConfig,
    Target::Pickle,
];

const DICOM_DICT: &[&[u8]] = &[
    b"DICM",
    b"\xe0\x7f\x10\x00",
    b"\x28\x00\x10\x00",
    b"\x28\x00\x11\x00",
    b"\x28\x00\x08\x00",
    b"\x28\x00\x00\x01",
    b"\x28\x00\x02\x00",
    b"\xfe\xff\x00\xe0",
    b"\xfe\xff\xdd\xe0",
    b"\xff\xff\xff\xff",
    b"OB",
    b"OW",
    b"UN",
    b"SQ",
    b"US",
    b"SS",
    b"DS",
    b"IS",
    b"1.2.840.10008.1.2",
    b"1.2.840.10008.1.2.1",
    b"1.2.840.10008.1.2.2",
    b"1.2.840.10008.1.2.5",
    b"1.2.840.10008.1.2.4.50",
    b"1.2.840.10008.1.2.4.80",
    b"1.2.840.10008.1.2.4.90",
    b"MONOCHROME1",
    b"MONOCHROME2",
    b"RGB ",
    b"PALETTE COLOR",
    b"YBR_FULL_422",
];
const NIFTI_DICT: &[&[u8]] = &[
    b"n+1\0",
    b"ni1\0",
    b"n+2\0",
    b"\x5c\x01\x00\x00",
    b"\x1c\x02\x00\x00",
    b"\x00\x00\x80\x7f",
    b"\x00\x00\xc0\x7f",
    b"\x00\x00\x80\xff",
];
const NPY_DICT: &[&[u8]] = &[
    b"\x93NUMPY",
    b"'descr': '<f4'",
    b"'descr': '|u1'",
    b"'descr': '>i8'",
    b"'fortran_order': True",
    b"'shape': (",
    b"()",
    b"(0,)",
    b"(4294967296, 4294967296)",
    b"18446744073709551615",
    b", ",
    b"PK\x03\x04",
];
const JSON_DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"\\u0000",
    b"\\ud800",
    b"\"image\":",
    b"\"labels\":",
    b"\"boxes\":",
    b"\"masks\":",
    b"\"qa\":",
    b"\"label\": 3",
    b"\n",
    b"#",
    b"../",
    b"/",
];
const CSV_DICT: &[&[u8]] = &[
    b",",
    b"\"",
    b"\n",
    b"\r\n",
    b";",
    b"image",
    b"label",
    b"labels",
    b"boxes",
    b"mask",
    b"question",
    b"answer",
    b"[{\"label\":\"a\",\"x0\":1e999}]",
    b"\xff\xfe",
    b"../",
];
const TOML_DICT: &[&[u8]] = &[
    b"=",
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"\"",
    b"'''",
    b"\n",
    b"0",
    b"-1",
    b"nan",
    b"inf",
    b"-inf",
    b"1e308",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"0.0",
    b"true",
    b"[model.scratch]",
    b"[model]",
    b"[data]",
    b"[optim]",
    b"[loss]",
    b"[finetune]",
    b"[freeze]",
    b"image_size",
    b"batch_size",
    b"patch_size",
    b"epochs",
    b"lr",
];
const PICKLE_DICT: &[&[u8]] = &[
    b"\x80\x02",
    b"(",
    b"t",
    b"R",
    b"}",
    b"]",
    b")",
    b"q\x00",
    b"h\x00",
    b"K\xff",
    b"M\xff\xff",
    b"J\xff\xff\xff\x7f",
    b"J\xff\xff\xff\xff",
    b"X\xff\xff\xff\x7f",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ctorch\nFloatStorage\n",
    b"ctorch\nHalfStorage\n",
    b"ccollections\nOrderedDict\n",
    b"P",
    b"u",
    b"e",
    b"s",
    b".",
];

impl Target {
    /// The name used on the command line and for folders.
    pub fn name(self) -> &'static str {
        match self {
            Target::Dicom => "dicom",
            Target::Nifti => "nifti",
            Target::Npy => "npy",
            Target::ManifestJsonl => "manifest-jsonl",
            Target::ManifestCsv => "manifest-csv",
            Target::TrainConfig => "train-config",
            Target::Pickle => "pickle",
        }
    }

    /// Parse a command-line name (`npz` is an alias of `npy`).
    pub fn from_name(s: &str) -> Option<Target> {
        if s == "npz" {
            return Some(Target::Npy);
        }
        ALL.iter().copied().find(|t| t.name() == s)
    }

    /// Tokens worth inserting for this format.
    pub fn dict(self) -> &'static [&'static [u8]] {
        match self {
            Target::Dicom => DICOM_DICT,
            Target::Nifti => NIFTI_DICT,
            Target::Npy => NPY_DICT,
            Target::ManifestJsonl => JSON_DICT,
            Target::ManifestCsv => CSV_DICT,
            Target::TrainConfig => TOML_DICT,
            Target::Pickle => PICKLE_DICT,
        }
    }

    /// The seed inputs: the repository's real test files for this format plus
    /// every file under `fuzz/seeds/<target>/` and `extra` (a `--corpus` folder).
    /// `root` is the workspace root.
    pub fn seeds(self, root: &Path, extra: Option<&Path>) -> Vec<(PathBuf, Vec<u8>)> {
        let io_data = root.join("crates/medvlm-io/tests/data");
        let mut files: Vec<PathBuf> = Vec::new();
        let ends = |p: &Path, suffixes: &[&str]| {
            let n = p.to_string_lossy().to_ascii_lowercase();
            suffixes.iter().any(|s| n.ends_with(s))
        };
        match self {
            Target::Dicom => files.extend(list(&io_data).filter(|p| ends(p, &[".dcm"]))),
            Target::Nifti => files.extend(list(&io_data).filter(|p| ends(p, &[".nii", ".nii.gz"]))),
            Target::Npy => files.extend(list(&io_data).filter(|p| ends(p, &[".npy", ".npz"]))),
            Target::TrainConfig => {
                files.extend(list(&root.join("configs")).filter(|p| ends(p, &[".toml"])))
            }
            Target::Pickle => {
                let fixtures = root.join("crates/medvlm-models/tests/fixtures");
                for d in list(&fixtures) {
                    files.extend(list(&d).filter(|p| ends(p, &[".bin"])));
                }
            }
            Target::ManifestJsonl | Target::ManifestCsv => {}
        }
        files.extend(list(&root.join("fuzz/seeds").join(self.name())));
        if let Some(dir) = extra {
            files.extend(list(dir));
        }
        let mut out = Vec::new();
        for p in files {
            let Ok(mut bytes) = std::fs::read(&p) else {
                continue;
            };
            if bytes.len() > mutate::MAX_INPUT {
                continue;
            }
            match self {
                // Mutate NIfTI uncompressed (a flipped bit in a gzip stream only
                // tests the CRC); `prepare` gzips some inputs again.
                Target::Nifti if bytes.starts_with(&[0x1f, 0x8b]) => {
                    if let Some(raw) = mutate::gunzip(&bytes) {
                        bytes = raw;
                    }
                }
                // The arrays inside a .npz are seeds for the .npy path too.
                Target::Npy if bytes.starts_with(b"PK") => {
                    for (name, data) in mutate::unzip(&bytes).unwrap_or_default() {
                        out.push((p.join(name), data));
                    }
                }
                _ => {}
            }
            out.push((p, bytes));
        }
        out
    }

    /// A mutated input from `input` (and splice partner `other`).
    pub fn mutate(self, rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
        let zipped = input.starts_with(b"PK\x03\x04");
        let inner = match self {
            Target::Pickle => Some("data.pkl"),
            Target::Npy => Some(".npy"),
            _ => None,
        };
        if let (true, Some(prefer)) = (zipped, inner) {
            if rng.random_bool(0.8) {
                if let Some(m) = mutate::mutate_in_zip(rng, input, other, self.dict(), prefer) {
                    return m;
                }
            }
        }
        mutate::mutate(rng, input, other, self.dict())
    }

    /// The bytes to write to disk for a mutated input: NIfTI is gzipped one time in four.
    pub fn prepare(self, rng: &mut ChaCha8Rng, input: Vec<u8>) -> Vec<u8> {
        if self == Target::Nifti && !input.starts_with(&[0x1f, 0x8b]) && rng.random_bool(0.25) {
            return mutate::gzip(&input);
        }
        input
    }

    /// File extension for these bytes (the readers dispatch on it).
    pub fn extension(self, bytes: &[u8]) -> &'static str {
        match self {
            Target::Dicom => "dcm",
            Target::Nifti if bytes.starts_with(&[0x1f, 0x8b]) => "nii.gz",
            Target::Nifti => "nii",
            Target::Npy if bytes.starts_with(b"PK") => "npz",
            Target::Npy => "npy",
            Target::ManifestJsonl => "jsonl",
            Target::ManifestCsv => "csv",
            Target::TrainConfig => "toml",
            Target::Pickle => "bin",
        }
    }

    /// Run the target on `bytes`, already written to `path`. `Err` carries the
    /// reader's error message (an error is a normal outcome; only a panic, an
    /// abort or a hang is a bug).
    pub fn run(self, path: &Path, bytes: &[u8]) -> Result<(), String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        match self {
            Target::Dicom | Target::Nifti => {
                let img = medvlm_io::load_any(path).map_err(|x| e(&x))?;
                exercise_image(&img)
            }
            Target::Npy if bytes.starts_with(b"PK") => {
                let m = medvlm_io::medmnist::read_medmnist(path).map_err(|x| e(&x))?;
                for split in m.splits.values() {
                    for i in 0..split.len().min(3) {
                        let _ = split.label(i);
                        let img = split.image(i).map_err(|x| e(&x))?;
                        exercise_image(&img)?;
                    }
                }
                Ok(())
            }
            Target::Npy => {
                let direct = medvlm_io::npy::decode_npy(bytes).map(|a| a.shape.len());
                let img = medvlm_io::load_any(path).map_err(|x| e(&x))?;
                exercise_image(&img)?;
                direct.map(|_| ())
            }
            Target::ManifestJsonl | Target::ManifestCsv => {
                let m = medvlm_io::read_manifest(path).map_err(|x| e(&x))?;
                for r in &m.records {
                    let _ = m.image_path(r);
                }
                let _ = m.split("train").count();
                Ok(())
            }
            Target::TrainConfig => {
                use medvlm_train::train_config::{Command, TrainConfig};
                let text = String::from_utf8_lossy(bytes);
                let cfg = TrainConfig::from_toml_str(&text, path).map_err(|x| e(&x))?;
                let pre = cfg.validate(Command::Pretrain);
                let fine = cfg.validate(Command::Finetune);
                if let Some(s) = &cfg.model.scratch {
                    let _ = s.estimated_parameters(cfg.data.image_size);
                    let _ = s.estimated_training_bytes(cfg.data.image_size, cfg.data.batch_size);
                }
                // A config is for one command; accepted if either validates.
                pre.or(fine).map_err(|x| e(&x))
            }
            Target::Pickle => {
                use medvlm_models::weights::WeightFile;
                let wf = WeightFile::open(path).map_err(|x| e(&x))?;
                let _ = wf.named_shapes();
                let names: Vec<String> = wf.tensors().map(|(n, _, _)| n.to_string()).collect();
                for name in names.iter().take(64) {
                    wf.tensor(name, candle_core::DType::F32, &candle_core::Device::Cpu)
                        .map_err(|x| e(&x))?;
                }
                Ok(())
            }
        }
    }
}

/// Take the default plane, the last frame, and try a maximum-intensity
/// projection (an error there is fine: it only applies to volumes).
fn exercise_image(img: &medvlm_io::MedImage) -> Result<(), String> {
    let mut sel = medvlm_io::PlaneSelect::default();
    let p = img.plane(&sel).map_err(|x| x.to_string())?;
    let _ = (p.rows, p.cols);
    sel.frame = Some(img.frames().saturating_sub(1));
    img.plane(&sel).map_err(|x| x.to_string())?;
    sel.frame = None;
    sel.mip = true;
    let _ = img.plane(&sel);
    Ok(())
}

/// Entries directly in `dir`, sorted; empty if `dir` is missing (folders are
/// skipped later because reading them fails).
fn list(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v.into_iter()
}
