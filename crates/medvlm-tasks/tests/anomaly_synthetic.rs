//! Few-shot anomaly detection on synthetic patch tokens: normal images are textures of four
//! patch prototypes; anomalous ones carry a 2x2-patch block of a fifth. The memory of six normal
//! images must find and localise the blocks (image AUROC, pixel AUROC, AUPRO), and the
//! threshold chosen on normal calibration images must hold its false-positive rate on new
//! normal images.

use medvlm_eval::anomaly::{aupro, pixel_auroc, PixelMap};
use medvlm_eval::auroc::auroc_binary;
use medvlm_tasks::anomaly::{
    anomaly_maps, image_scores, patches_from, MemoryConfig, NormalMemory, Threshold,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

const GRID: usize = 8;
const D: usize = 16;
const SIZE: usize = 32; // 4 px per patch

/// `n` images of patch tokens; with `defect`, each has a 2x2 block of the anomaly prototype
/// at a random place, returned as a pixel mask.
fn images(
    rng: &mut ChaCha8Rng,
    protos: &[Vec<f32>],
    n: usize,
    defect: bool,
) -> (Vec<f32>, Vec<Vec<bool>>) {
    let noise = Normal::new(0.0f32, 0.15).unwrap();
    let mut buf = Vec::new();
    let mut masks = Vec::new();
    for _ in 0..n {
        let (by, bx) = (rng.random_range(0..GRID - 1), rng.random_range(0..GRID - 1));
        let mut mask = vec![false; SIZE * SIZE];
        for py in 0..GRID {
            for px in 0..GRID {
                let inside = defect && (by..by + 2).contains(&py) && (bx..bx + 2).contains(&px);
                let k = if inside {
                    4
                } else {
                    (py + px) % 2 + 2 * (py % 2)
                };
                for v in &protos[k] {
                    buf.push(v + noise.sample(rng));
                }
                if inside {
                    for y in py * 4..py * 4 + 4 {
                        for x in px * 4..px * 4 + 4 {
                            mask[y * SIZE + x] = true;
                        }
                    }
                }
            }
        }
        masks.push(mask);
    }
    (buf, masks)
}

#[test]
fn memory_of_normals_finds_and_localises_defects() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let unit = Normal::new(0.0f32, 1.0).unwrap();
    let protos: Vec<Vec<f32>> = (0..5)
        .map(|_| (0..D).map(|_| unit.sample(&mut rng)).collect())
        .collect();
    let p = GRID * GRID;
    let (normal, _) = images(&mut rng, &protos, 6, false);
    let memory = NormalMemory::fit(
        &patches_from(&normal, 6, p, D).unwrap(),
        (GRID, GRID),
        MemoryConfig {
            max_size: 300, // below 6 x 64: the seeded subset is exercised
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(memory.features.dims(), &[300, D]);

    let score = |buf: &[f32], n: usize| {
        let s = memory
            .patch_scores(&patches_from(buf, n, p, D).unwrap())
            .unwrap();
        anomaly_maps(&s, (GRID, GRID), SIZE, 2.0).unwrap()
    };
    let (calib, _) = images(&mut rng, &protos, 20, false);
    let threshold = Threshold::on_normals(&image_scores(&score(&calib, 20)), 0.1).unwrap();

    let (test_ok, ok_masks) = images(&mut rng, &protos, 20, false);
    let (test_bad, bad_masks) = images(&mut rng, &protos, 20, true);
    let maps: Vec<Vec<f32>> = score(&test_ok, 20)
        .into_iter()
        .chain(score(&test_bad, 20))
        .collect();
    let masks: Vec<Vec<bool>> = ok_masks.into_iter().chain(bad_masks).collect();
    let scores = image_scores(&maps);
    let labels: Vec<bool> = (0..40).map(|i| i >= 20).collect();
    let image_auroc = auroc_binary(&scores, &labels).unwrap().unwrap();
    let pixel_maps: Vec<PixelMap> = maps
        .iter()
        .zip(&masks)
        .map(|(m, k)| PixelMap {
            scores: m,
            defect: k,
            height: SIZE,
            width: SIZE,
        })
        .collect();
    let pix = pixel_auroc(&pixel_maps).unwrap().unwrap();
    let pro = aupro(&pixel_maps, 0.3).unwrap().unwrap();
    assert!(image_auroc > 0.95, "image AUROC {image_auroc}");
    assert!(pix > 0.9, "pixel AUROC {pix}");
    assert!(pro > 0.7, "AUPRO {pro}");
    // The decision: new normals rarely above the threshold, defects mostly above.
    let called = threshold.decide(&scores);
    let fp = called[..20].iter().filter(|&&c| c).count();
    let tp = called[20..].iter().filter(|&&c| c).count();
    assert!(fp <= 5, "{fp} of 20 normal images called anomalous");
    assert!(tp >= 16, "{tp} of 20 defects found");

    // A memory of the wrong width is refused, naming the shapes.
    let wrong = patches_from(&vec![0.0; 2 * p * 8], 2, p, 8).unwrap();
    assert!(memory.patch_scores(&wrong).is_err());
}
