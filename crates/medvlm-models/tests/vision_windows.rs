//! Window embeddings (`ImageEncoder::encode_image_windows`, WinCLIP's window masking) on the
//! tiny random-weight parity fixtures:
//!
//! - the window of every patch is the whole image: `encode_image`'s embeddings (CLIP,
//!   BiomedCLIP);
//! - a window sees only its own patches: pixels outside it change nothing, a pixel inside
//!   changes the embedding; each patch keeps its own position (swapping the contents of two
//!   patches of a window changes it, listing the window's patches in another order does not);
//! - windows are computed independently of each other and of the other images of the batch;
//! - uneven, empty, out-of-range and repeated windows are errors; towers without a class
//!   token sequence say so.

mod support;

use candle_core::{DType, Device, IndexOp, Tensor};
use medvlm_models::biomedclip::BiomedClip;
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::openclip::OpenClipResNet;
use medvlm_models::siglip::{SiglipConfig, SiglipModel};
use medvlm_models::weights::{LoadMode, WeightFile};
use medvlm_models::ImageEncoder;
use support::{assert_close, fixture, inputs, load_st, max_abs_diff};

fn clip() -> ClipModel {
    let cfg = ClipConfig::from_file(&fixture("clip").join("config.json")).unwrap();
    let wf = WeightFile::open(fixture("clip").join("model.safetensors")).unwrap();
    wf.load(
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
        &["position_ids"],
        |vb| ClipModel::load(vb, &cfg),
    )
    .unwrap()
}

/// `px` with the pixels of patch `p` (row-major on a grid of `g` x `g` patches of `ps` px)
/// replaced by `value`.
fn paint_patch(px: &Tensor, p: usize, g: usize, ps: usize, value: f32) -> Tensor {
    let (b, c, h, w) = px.dims4().unwrap();
    let mut v: Vec<f32> = px.flatten_all().unwrap().to_vec1().unwrap();
    let (r0, c0) = ((p / g) * ps, (p % g) * ps);
    for bi in 0..b {
        for ci in 0..c {
            for y in r0..r0 + ps {
                for x in c0..c0 + ps {
                    v[((bi * c + ci) * h + y) * w + x] = value;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
}

/// `px` with the pixels of patches `a` and `b` exchanged.
fn swap_patches(px: &Tensor, a: usize, b: usize, g: usize, ps: usize) -> Tensor {
    let (n, c, h, w) = px.dims4().unwrap();
    let mut v: Vec<f32> = px.flatten_all().unwrap().to_vec1().unwrap();
    let (ra, ca) = ((a / g) * ps, (a % g) * ps);
    let (rb, cb) = ((b / g) * ps, (b % g) * ps);
    for bi in 0..n {
        for ci in 0..c {
            for dy in 0..ps {
                for dx in 0..ps {
                    let ia = ((bi * c + ci) * h + ra + dy) * w + ca + dx;
                    let ib = ((bi * c + ci) * h + rb + dy) * w + cb + dx;
                    v.swap(ia, ib);
                }
            }
        }
    }
    Tensor::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap()
}

#[test]
fn clip_window_of_every_patch_is_the_whole_image() {
    let m = clip();
    let (px, _) = inputs("clip");
    assert!(m.supports_image_windows());
    let all: Vec<usize> = (0..16).collect();
    let w = m.encode_image_windows(&px, &[all]).unwrap();
    let full = m.encode_image(&px).unwrap().embeds;
    assert_eq!(w.dims(), &[2, 1, full.dim(1).unwrap()]);
    assert_close(
        "full window vs encode_image",
        &w.i((.., 0)).unwrap(),
        &full,
        1e-5,
    );
}

#[test]
fn clip_window_sees_only_its_patches_each_at_its_position() {
    let m = clip();
    let (px, _) = inputs("clip");
    // 4 x 4 grid of 8 px patches; window: the 2 x 2 square at the top left.
    let window = vec![0, 1, 4, 5];
    let base = m
        .encode_image_windows(&px, std::slice::from_ref(&window))
        .unwrap();
    // Every patch outside the window painted over: the same embedding.
    let mut outside = px.clone();
    for p in (0..16).filter(|p| !window.contains(p)) {
        outside = paint_patch(&outside, p, 4, 8, 3.0);
    }
    let same = m
        .encode_image_windows(&outside, std::slice::from_ref(&window))
        .unwrap();
    assert_close("outside pixels changed", &same, &base, 1e-6);
    // ... while the whole image's embedding moves.
    assert!(
        max_abs_diff(
            &m.encode_image(&outside).unwrap().embeds,
            &m.encode_image(&px).unwrap().embeds
        ) > 1e-3
    );
    // One patch inside painted: the embedding moves.
    let inside = paint_patch(&px, 5, 4, 8, 3.0);
    let moved = m
        .encode_image_windows(&inside, std::slice::from_ref(&window))
        .unwrap();
    assert!(max_abs_diff(&moved, &base) > 1e-3);
    // The order in which the window lists its patches does not matter ...
    let reordered = m.encode_image_windows(&px, &[vec![5, 0, 4, 1]]).unwrap();
    assert_close("window order", &reordered, &base, 1e-5);
    // ... but the positions do: two patches' contents exchanged is another image.
    let swapped = m
        .encode_image_windows(&swap_patches(&px, 0, 5, 4, 8), &[window])
        .unwrap();
    assert!(max_abs_diff(&swapped, &base) > 1e-3);
}

#[test]
fn clip_windows_are_independent_of_each_other_and_of_the_batch() {
    let m = clip();
    let (px, _) = inputs("clip");
    let windows = vec![vec![0, 1, 4, 5], vec![10, 11, 14, 15], vec![2, 3, 6, 7]];
    let together = m.encode_image_windows(&px, &windows).unwrap();
    let e = m.encode_image(&px).unwrap().embeds.dim(1).unwrap();
    assert_eq!(together.dims(), &[2, 3, e]);
    for (i, w) in windows.iter().enumerate() {
        let alone = m
            .encode_image_windows(&px, std::slice::from_ref(w))
            .unwrap();
        assert_close(
            "window alone",
            &together.i((.., i)).unwrap(),
            &alone.i((.., 0)).unwrap(),
            1e-5,
        );
        let one_image = m
            .encode_image_windows(&px.i(1..2).unwrap(), std::slice::from_ref(w))
            .unwrap();
        assert_close(
            "image alone",
            &together.i((1, i)).unwrap(),
            &one_image.i((0, 0)).unwrap(),
            1e-5,
        );
    }
    // Different windows of one image differ.
    assert!(max_abs_diff(&together.i((.., 0)).unwrap(), &together.i((.., 1)).unwrap()) > 1e-3);
}

#[test]
fn bad_windows_are_errors_naming_the_problem() {
    let m = clip();
    let (px, _) = inputs("clip");
    let err = |w: &[Vec<usize>]| m.encode_image_windows(&px, w).unwrap_err().to_string();
    assert!(err(&[]).contains("no window"), "{}", err(&[]));
    assert!(err(&[vec![]]).contains("no window"));
    let e = err(&[vec![0, 1], vec![2]]);
    assert!(
        e.contains("window 1 holds 1 patches") && e.contains("same size"),
        "{e}"
    );
    let e = err(&[vec![0, 16]]);
    assert!(e.contains("patch 16") && e.contains("16 patches"), "{e}");
    let e = err(&[vec![3, 3]]);
    assert!(e.contains("twice"), "{e}");
}

#[test]
fn biomedclip_window_of_every_patch_is_the_whole_image_and_windows_are_local() {
    let dir = fixture("biomedclip");
    let m = BiomedClip::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let px = load_st(dir.join("expected.safetensors"))["pixel_values"].clone();
    assert!(m.supports_image_windows());
    // 32 px at patch 8: a 4 x 4 grid.
    let full = m.encode_image(&px).unwrap().embeds;
    let all: Vec<usize> = (0..16).collect();
    let w = m.encode_image_windows(&px, &[all]).unwrap();
    assert_close(
        "full window vs encode_image",
        &w.i((.., 0)).unwrap(),
        &full,
        1e-5,
    );
    let window = vec![0, 4, 8, 12]; // the left column
    let left = m
        .encode_image_windows(&px, std::slice::from_ref(&window))
        .unwrap();
    let mut painted = px.clone();
    for p in (0..16).filter(|p| !window.contains(p)) {
        painted = paint_patch(&painted, p, 4, 8, 2.0);
    }
    assert_close(
        "other columns painted",
        &m.encode_image_windows(&painted, std::slice::from_ref(&window))
            .unwrap(),
        &left,
        1e-5,
    );
    let inside = paint_patch(&px, 8, 4, 8, 2.0);
    assert!(max_abs_diff(&m.encode_image_windows(&inside, &[window]).unwrap(), &left) > 1e-3);
}

#[test]
fn towers_without_windows_say_so() {
    let dir = fixture("openclip_resnet");
    let m = OpenClipResNet::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let px = load_st(dir.join("inputs.safetensors"))["pixel_values"].clone();
    assert!(!m.supports_image_windows());
    let err = m
        .encode_image_windows(&px, &[vec![0]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot encode windows"), "{err}");
    // SigLIP pools with an attention head, not a class token.
    let cfg = SiglipConfig::from_file(&fixture("siglip").join("config.json")).unwrap();
    let wf = WeightFile::open(fixture("siglip").join("model.safetensors")).unwrap();
    let s = wf
        .load(
            DType::F32,
            &Device::Cpu,
            &LoadMode::Frozen,
            &["position_ids"],
            |vb| SiglipModel::load(vb, &cfg),
        )
        .unwrap();
    let (px, _) = inputs("siglip");
    assert!(!s.supports_image_windows());
    let err = s
        .encode_image_windows(&px, &[vec![0]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot encode windows"), "{err}");
}
