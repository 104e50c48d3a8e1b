//! `medvlm convert`: DICOM / NIfTI / PNG / JPEG / TIFF / .npy to PNG or NumPy `.npy`,
//! with windowing, frame/slice selection, and DICOM de-identification.
//!
//! `.npy` with `--window none` (the default for `.npy`) holds float32 values after
//! the Modality LUT and before any VOI: `[rows, cols]` for one grey frame,
//! `[rows, cols, 3]` for colour, `[frames, ...]` for multi-frame, and for NIfTI the
//! scaled data in nibabel's `get_fdata()` shape. With `--frame`/`--slice`/`--mip`
//! only that plane is written. Any other window writes the windowed plane in [0, 1].
//! PNG is always one 8-bit plane (default window `auto`: the file's window, else
//! percentile clipping).

use std::path::PathBuf;

use anyhow::{bail, Context};
use medvlm_io::medimage::PlaneSelect;
use medvlm_io::preprocess::windowed_plane;
use medvlm_io::Window;

/// Arguments of `medvlm convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input file (.dcm, .nii, .nii.gz, .png, .jpg, .tif, .npy).
    pub input: PathBuf,
    /// Output file: .png, .npy, or .dcm with --deidentify.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Window: none, auto, file, file:K, lung, mediastinum, bone, brain, abdomen,
    /// soft-tissue, C/W (e.g. -600/1500) or pLOW-HIGH (e.g. p1-99).
    /// Default: none for .npy, auto for .png.
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Frame of a multi-frame DICOM (or volume of a 4-D NIfTI), 0-based.
    #[arg(long)]
    pub frame: Option<usize>,
    /// NIfTI axis to slice across: x, y, z (or 0, 1, 2). Default z.
    #[arg(long)]
    pub axis: Option<String>,
    /// Slice index along --axis (default: the middle slice).
    #[arg(long)]
    pub slice: Option<usize>,
    /// Maximum-intensity projection along --axis instead of one slice.
    #[arg(long, conflicts_with = "slice")]
    pub mip: bool,
    /// Write a de-identified DICOM copy (PS3.15 Annex E basic profile) to --out.
    #[arg(long)]
    pub deidentify: bool,
    /// Secret salt for replacing UIDs with --deidentify; use the same salt for all
    /// files of a dataset so references between them stay consistent.
    /// Default: a random salt per invocation.
    #[arg(long, requires = "deidentify")]
    pub salt: Option<String>,
}

fn parse_axis(a: &str) -> anyhow::Result<usize> {
    Ok(match a.to_ascii_lowercase().as_str() {
        "x" | "0" | "sagittal" => 0,
        "y" | "1" | "coronal" => 1,
        "z" | "2" | "axial" => 2,
        other => bail!("invalid --axis {other:?}: use x, y or z"),
    })
}

fn random_salt() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{t:x}-{:x}", std::process::id())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ext = args
        .out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if args.deidentify {
        if ext != "dcm" {
            bail!("--deidentify writes DICOM: give --out a .dcm path");
        }
        let salt = args.salt.clone().unwrap_or_else(random_salt);
        let present = medvlm_io::deidentify::deidentify_file(&args.input, &args.out, &salt)
            .with_context(|| format!("de-identifying {}", args.input.display()))?;
        println!(
            "wrote {} (de-identified; identifying attributes that had values: {})",
            args.out.display(),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        );
        return Ok(());
    }
    if ext != "png" && ext != "npy" {
        bail!(
            "unsupported output {}: use .png or .npy (or .dcm with --deidentify)",
            args.out.display()
        );
    }
    let img = medvlm_io::load_any(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    for w in &img.warnings {
        eprintln!("warning: {w}");
    }
    let window: Window = match &args.window {
        Some(w) => w.parse()?,
        None if ext == "npy" => Window::None,
        None => Window::Auto,
    };
    let axis = args.axis.as_deref().map(parse_axis).transpose()?;
    let select = PlaneSelect {
        frame: args.frame,
        axis,
        slice: args.slice,
        mip: args.mip,
    };
    let whole = args.frame.is_none() && axis.is_none() && args.slice.is_none() && !args.mip;
    // One plane is written unless .npy holds the whole image unwindowed: with several frames
    // (or 4-D volumes) that plane must be chosen, never silently the first.
    let one_plane = ext == "png" || window != Window::None || !whole;
    if one_plane && args.frame.is_none() && img.frames() > 1 {
        bail!(
            "{} has {} frames: choose one with --frame N (0-based), or write all of them \
             unwindowed to .npy",
            args.input.display(),
            img.frames()
        );
    }
    if ext == "npy" {
        if window == Window::None {
            if whole {
                medvlm_io::npy::write_npy_f32(&args.out, &img.shape, &img.data)?;
                println!(
                    "wrote {} float32 {:?} (after Modality LUT, no VOI)",
                    args.out.display(),
                    img.shape
                );
            } else {
                let p = img.plane(&select)?;
                let shape = plane_shape(&p);
                medvlm_io::npy::write_npy_f32(&args.out, &shape, &p.data)?;
                println!(
                    "wrote {} float32 {:?} (after Modality LUT, no VOI)",
                    args.out.display(),
                    shape
                );
            }
        } else {
            let p = windowed_plane(&img, &select, &window)?;
            let shape = plane_shape(&p);
            medvlm_io::npy::write_npy_f32(&args.out, &shape, &p.data)?;
            println!(
                "wrote {} float32 {:?} windowed to [0, 1]",
                args.out.display(),
                shape
            );
        }
        return Ok(());
    }
    let p = windowed_plane(&img, &select, &window)?;
    medvlm_io::raster::write_png(&args.out, &p)?;
    println!(
        "wrote {} ({}x{}, {} channel(s), 8-bit)",
        args.out.display(),
        p.rows,
        p.cols,
        p.channels
    );
    Ok(())
}

fn plane_shape(p: &medvlm_io::Plane) -> Vec<usize> {
    if p.channels == 1 {
        vec![p.rows, p.cols]
    } else {
        vec![p.rows, p.cols, p.channels]
    }
}
