//! WinCLIP's zero-shot maps ([`medvlm_tasks::winclip::zero_shot`]) on the CLIP parity fixture
//! (random weights, 32 px, a 4 x 4 patch grid): the scores are the abnormal probabilities of
//! the windows' embeddings, aggregated as the module says.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use medvlm_tasks::winclip::{
    abnormal_probabilities, harmonic_aggregate, square_windows, window_embeddings,
    window_embeddings_in_passes, zero_shot, WindowConfig, WindowMemory,
};

fn pixels() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

fn states(m: &medvlm_models::LoadedModel) -> Tensor {
    let lists = vec![
        vec!["a normal image".to_string()],
        vec!["an abnormal image".to_string()],
        vec!["an image with a lesion".to_string()],
    ];
    medvlm_tasks::segmentation_pipeline::prompt_embeddings(m, &lists, &Device::Cpu).unwrap()
}

fn scale(m: &medvlm_models::LoadedModel) -> f64 {
    m.model
        .logit_scale()
        .to_dtype(DType::F32)
        .unwrap()
        .exp()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn the_window_of_the_whole_grid_gives_a_flat_map_at_the_image_score() {
    let m = common::model();
    let st = states(&m);
    let cfg = WindowConfig {
        scales: vec![4],
        stride: 1,
    };
    let z = zero_shot(m.model.as_ref(), &pixels(), &st, (4, 4), &cfg).unwrap();
    assert_eq!(z.patch_maps.len(), 2);
    // The image score by hand: the whole image's embedding against the states.
    let whole = m.model.encode_image(&pixels()).unwrap().embeds;
    let by_hand = abnormal_probabilities(&whole, &st, scale(&m)).unwrap();
    for ((score, map), want) in z.image_scores.iter().zip(&z.patch_maps).zip(&by_hand) {
        assert!((score - want).abs() < 1e-6);
        assert!(*score > 0.0 && *score < 1.0);
        for &p in map {
            assert!((p - want).abs() < 1e-4, "{p} vs {want}");
        }
    }
}

#[test]
fn two_scales_average_the_harmonic_maps_of_their_windows() {
    let m = common::model();
    let st = states(&m);
    let px = pixels();
    let z = zero_shot(m.model.as_ref(), &px, &st, (4, 4), &WindowConfig::default()).unwrap();
    let s = scale(&m);
    let mut want = vec![vec![0f32; 16]; 2];
    for side in [2, 3] {
        let windows = square_windows((4, 4), side, 1).unwrap();
        for (i, row) in want.iter_mut().enumerate() {
            // Each window embedded on its own, one image at a time.
            let probs: Vec<f32> = windows
                .iter()
                .map(|w| {
                    let e = m
                        .model
                        .encode_image_windows(&px.i(i..i + 1).unwrap(), std::slice::from_ref(w))
                        .unwrap()
                        .squeeze(1)
                        .unwrap();
                    abnormal_probabilities(&e, &st, s).unwrap()[0]
                })
                .collect();
            let agg = harmonic_aggregate(&probs, &windows, 16).unwrap();
            row.iter_mut().zip(agg).for_each(|(a, b)| *a += b / 2.0);
        }
    }
    for (i, (got, want)) in z.patch_maps.iter().zip(&want).enumerate() {
        for (p, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-5, "image {i} patch {p}: {g} vs {w}");
        }
        // Random weights still give a map that is not flat.
        let (lo, hi) = got
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(hi - lo > 1e-4, "flat map {lo}..{hi}");
    }
}

#[test]
fn a_window_larger_than_the_grid_is_refused() {
    let m = common::model();
    let cfg = WindowConfig {
        scales: vec![5],
        stride: 1,
    };
    let err = zero_shot(m.model.as_ref(), &pixels(), &states(&m), (4, 4), &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("5 x 5") && err.contains("4 x 4"), "{err}");
}

#[test]
fn window_memory_of_an_image_finds_its_own_windows_normal() {
    let m = common::model();
    let px = pixels();
    let cfg = WindowConfig::default();
    let (per_scale, _) = window_embeddings(m.model.as_ref(), &px, (4, 4), &cfg).unwrap();
    // The memory holds image 0's windows only.
    let first: Vec<Tensor> = per_scale.iter().map(|t| t.i(0..1).unwrap()).collect();
    let memory = WindowMemory::fit(&first).unwrap();
    assert_eq!(
        memory.per_scale[0].dims(),
        &[9, per_scale[0].dim(2).unwrap()]
    );
    assert_eq!(memory.per_scale[1].dims()[0], 4);
    let maps = memory.patch_maps(&per_scale, (4, 4), &cfg).unwrap();
    // Image 0: every window is in the memory, distance 0 (floored) everywhere.
    assert!(maps[0].iter().all(|&v| v < 1e-4), "{:?}", maps[0]);
    // Image 1: by hand, its windows' distances to the nearest memory window, aggregated.
    let mut want = vec![0f32; 16];
    for (k, side) in [2usize, 3].into_iter().enumerate() {
        let windows = square_windows((4, 4), side, 1).unwrap();
        let d: Vec<f32> = (0..windows.len())
            .map(|w| {
                let q = per_scale[k].i((1, w)).unwrap();
                let best = (0..windows.len())
                    .map(|r| {
                        let mrow = per_scale[k].i((0, r)).unwrap();
                        (&q * &mrow)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    })
                    .fold(f32::MIN, f32::max);
                1.0 - best
            })
            .collect();
        for (a, b) in want
            .iter_mut()
            .zip(harmonic_aggregate(&d, &windows, 16).unwrap())
        {
            *a += b / 2.0;
        }
    }
    for (g, w) in maps[1].iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    assert!(maps[1].iter().all(|&v| v > 1e-4), "{:?}", maps[1]);
    // A memory of other scales is refused.
    let three = WindowConfig {
        scales: vec![2, 3, 4],
        stride: 1,
    };
    assert!(memory.patch_maps(&per_scale, (4, 4), &three).is_err());
}

#[test]
fn windows_embedded_in_several_passes_are_the_same() {
    let m = common::model();
    let cfg = WindowConfig::default();
    let (one, whole) = window_embeddings(m.model.as_ref(), &pixels(), (4, 4), &cfg).unwrap();
    // 2 images: 3 sequences per pass is one window per pass.
    let (many, whole2) =
        window_embeddings_in_passes(m.model.as_ref(), &pixels(), (4, 4), &cfg, 3).unwrap();
    assert_eq!(common::max_abs_diff(&whole, &whole2), 0.0);
    for (a, b) in one.iter().zip(&many) {
        assert_eq!(a.dims(), b.dims());
        assert!(common::max_abs_diff(a, b) < 1e-6);
    }
}
