//! The detection head alone on synthetic patch tokens: on a 4x4 grid, an object two cells
//! wide centred on an inner cell (so its box reaches half a cell into each neighbour), whose
//! centre token carries the object's feature and whose eight neighbours carry an "edge"
//! feature, the rest noise. A short training must learn both which token to pick (the
//! score) and that the box is twice the token's cell (the regression), and so ground the
//! object far better than the centre box.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use medvlm_eval::detection::grounding_accuracy;
use medvlm_tasks::detection::{
    centre_box, ground, token_predictions, train_head, DetHeadConfig, DetSample,
};

const D: usize = 16;
const E: usize = 8;

fn samples(n: usize, rng: &mut ChaCha8Rng, parts: &[Vec<f32>], text: &Tensor) -> Vec<DetSample> {
    let noise = Normal::new(0.0f32, 0.3).unwrap();
    (0..n)
        .map(|_| {
            // Centre cell in rows and columns 1..=2, so the box stays inside the image.
            let (r0, c0) = (rng.random_range(1..3usize), rng.random_range(1..3usize));
            let mut tokens = vec![0f32; 16 * D];
            for cell in 0..16 {
                let (r, c) = (cell / 4, cell % 4);
                let part = if (r, c) == (r0, c0) {
                    Some(0)
                } else if r.abs_diff(r0) <= 1 && c.abs_diff(c0) <= 1 {
                    Some(1)
                } else {
                    None
                };
                for k in 0..D {
                    tokens[cell * D + k] =
                        noise.sample(rng) + part.map(|p| parts[p][k]).unwrap_or(0.0);
                }
            }
            DetSample {
                tokens: Tensor::from_vec(tokens, (16, D), &Device::Cpu).unwrap(),
                text: text.clone(),
                boxes: vec![[
                    (c0 as f64 - 0.5) / 4.0,
                    (r0 as f64 - 0.5) / 4.0,
                    (c0 as f64 + 1.5) / 4.0,
                    (r0 as f64 + 1.5) / 4.0,
                ]],
            }
        })
        .collect()
}

#[test]
fn short_training_grounds_better_than_the_centre_box() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let unit = Normal::new(0.0f32, 1.0).unwrap();
    let parts: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..D).map(|_| unit.sample(&mut rng)).collect())
        .collect();
    let text = Tensor::from_vec(
        (0..E).map(|_| unit.sample(&mut rng)).collect::<Vec<f32>>(),
        E,
        &Device::Cpu,
    )
    .unwrap();
    let train = samples(48, &mut rng, &parts, &text);
    let test = samples(32, &mut rng, &parts, &text);
    let mut cfg = DetHeadConfig::new(D, E, (4, 4));
    cfg.width = 32;
    cfg.steps = 300;
    cfg.batch = 16;
    cfg.lr = 1e-2;
    let truth: Vec<[f64; 4]> = test.iter().map(|s| s.boxes[0]).collect();
    let grounded = |head| -> Vec<[f64; 4]> {
        token_predictions(head, &test, &Device::Cpu)
            .unwrap()
            .iter()
            .map(|t| ground(t).unwrap().0)
            .collect()
    };
    // Untrained: every token proposes its own cell, which never reaches IoU 0.5 with a box
    // twice its size (IoU 1/4 at best).
    let (fresh, _) = medvlm_tasks::detection::init_head(&cfg, &Device::Cpu).unwrap();
    let before = grounding_accuracy(&grounded(&fresh), &truth).unwrap();
    assert_eq!(before.accuracy_at_50, 0.0);

    let trained = train_head(&cfg, &train, &Device::Cpu).unwrap();
    // Every parameter trains, the input layer norm's included (candle-nn's fused layer norm
    // would leave its weight at one and its bias at zero).
    for (name, var) in medvlm_train::optim::varmap_params(&trained.varmap) {
        let t = var.as_tensor();
        let moved = if name == "norm.weight" {
            (t - 1.0).unwrap().abs().unwrap().max_all().unwrap()
        } else if name == "norm.bias" {
            t.abs().unwrap().max_all().unwrap()
        } else {
            continue;
        };
        assert!(
            moved.to_scalar::<f32>().unwrap() > 0.0,
            "{name} did not train"
        );
    }
    let first = trained.losses[0].total;
    let last = trained.losses.last().unwrap().total;
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let h = grounding_accuracy(&grounded(&trained.head), &truth).unwrap();
    let c = grounding_accuracy(&vec![centre_box(0.5, 0.5); test.len()], &truth).unwrap();
    assert!(
        h.accuracy_at_50 >= 0.9 && h.accuracy_at_50 > c.accuracy_at_50 + 0.5,
        "head Acc@0.5 {} (mIoU {}), centre {} (mIoU {})",
        h.accuracy_at_50,
        h.mean_iou,
        c.accuracy_at_50,
        c.mean_iou
    );
}
