//! Write a sample grid (PNG) per modality: `cargo run -p medvlm-phantoms
//! --example sample_grid --release -- OUT_DIR [SIZE] [COLS] [ROWS]`.
//! The committed grids in `docs/img/phantom_<modality>.png` come from
//! `OUT_DIR = docs/img`, size 96 (64 for RGB modalities), 4 x 4, seed 2024.

use medvlm_phantoms::{generate_study, Modality, StudyOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = std::path::PathBuf::from(args.first().map(String::as_str).unwrap_or("docs/img"));
    let size: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(96);
    let cols: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let rows: u32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(4);
    std::fs::create_dir_all(&out)?;
    let gap = 2;
    for m in Modality::ALL {
        // RGB grids are drawn smaller so each committed PNG stays well under
        // 200 KiB (sensor noise does not compress).
        let size = if m.channels() == 1 {
            size
        } else {
            size * 2 / 3 / 4 * 4
        };
        let opts = StudyOptions {
            size,
            ..Default::default()
        };
        let (gw, gh) = (cols * (size + gap) - gap, rows * (size + gap) - gap);
        let mut grid = image::RgbImage::from_pixel(gw, gh, image::Rgb([255, 255, 255]));
        for k in 0..cols * rows {
            let study = generate_study(m, 2024, k as u64, &opts);
            let img = study.to_dynamic_image().to_rgb8();
            let (ox, oy) = ((k % cols) * (size + gap), (k / cols) * (size + gap));
            image::imageops::replace(&mut grid, &img, ox as i64, oy as i64);
            println!("{} {}: {:?}", m.name(), k, study.labels());
        }
        let path = out.join(format!("phantom_{}.png", m.name()));
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let encoder = image::codecs::png::PngEncoder::new_with_quality(
            file,
            image::codecs::png::CompressionType::Best,
            image::codecs::png::FilterType::Adaptive,
        );
        if m.channels() == 1 {
            image::DynamicImage::ImageRgb8(grid)
                .to_luma8()
                .write_with_encoder(encoder)?;
        } else {
            grid.write_with_encoder(encoder)?;
        }
        println!("wrote {}", path.display());
    }
    Ok(())
}
