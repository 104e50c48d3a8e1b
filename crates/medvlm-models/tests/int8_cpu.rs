//! int8 inference on the CPU (`LinearLayers::pack_linear_int8`: Q8_0 weights through candle's
//! quantised matmul, inputs quantised in each product) against f32 on the committed parity
//! fixtures of every family: each image and text embedding within cosine 0.999 of the f32 one
//! while not equal to it (the int8 product really ran), the f32 weights dropped, a layer whose
//! width does not fit Q8_0's blocks kept in f32 and named, and trainable models refused with
//! the model left unchanged.

mod support;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarMap;
use medvlm_models::biomedclip::BiomedClip;
use medvlm_models::linear::INT8_BLOCK;
use medvlm_models::openclip::OpenClipResNet;
use medvlm_models::{
    load_model_dir, LinearLayer, LoadMode, LoadOptions, TokenBatch, VisionLanguageModel,
};
use support::{fixture, inputs, load_st, max_abs, max_abs_diff};

/// Packs `model` in int8 and compares its embeddings with `f32_model`'s.
fn pack_and_compare(
    name: &str,
    f32_model: &dyn VisionLanguageModel,
    model: &mut dyn VisionLanguageModel,
    pixels: &Tensor,
    tokens: &TokenBatch,
) {
    let total = model.linear_layers().len();
    let packing = model.pack_linear_int8().unwrap();
    assert_eq!(packing.int8 + packing.kept_f32.len(), total, "{name}");
    // Exactly the layers whose width fits the blocks run in int8.
    for l in model.linear_layers() {
        let fits = l.in_features().is_multiple_of(INT8_BLOCK);
        assert_eq!(l.is_int8(), fits, "{name}: {}", l.path());
        assert_eq!(packing.kept_f32.contains(&l.path().to_string()), !fits);
    }
    assert!(
        packing.int8 * 2 > total,
        "{name}: only {} of {total} layers in int8",
        packing.int8
    );
    eprintln!("{name}: {} of {total} layers int8", packing.int8);
    support::assert_embeddings_near_f32(name, "int8", f32_model, model, pixels, tokens);
}

#[test]
fn clip_and_siglip_in_int8_match_f32_embeddings() {
    for family in ["clip", "siglip"] {
        let f = load_model_dir(&fixture(family), &LoadOptions::default()).unwrap();
        let mut q = load_model_dir(&fixture(family), &LoadOptions::default()).unwrap();
        let (px, tokens) = inputs(family);
        pack_and_compare(family, f.model.as_ref(), q.model.as_mut(), &px, &tokens);
    }
}

#[test]
fn biomedclip_in_int8_matches_f32_embeddings() {
    let dir = fixture("biomedclip");
    let load = || BiomedClip::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let (f, mut q) = (load(), load());
    let exp = load_st(dir.join("expected.safetensors"));
    let input_ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let tokens = TokenBatch {
        attention_mask: f.text.pad_mask(&input_ids).unwrap(),
        input_ids,
    };
    pack_and_compare("biomedclip", &f, &mut q, &exp["pixel_values"], &tokens);
}

#[test]
fn openclip_resnet_in_int8_matches_f32_embeddings() {
    let dir = fixture("openclip_resnet");
    let load =
        || OpenClipResNet::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let (f, mut q) = (load(), load());
    let i = load_st(dir.join("inputs.safetensors"));
    let input_ids = i["input_ids"].to_dtype(DType::U32).unwrap();
    let tokens = TokenBatch {
        attention_mask: input_ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap(),
        input_ids,
    };
    pack_and_compare("openclip_resnet", &f, &mut q, &i["pixel_values"], &tokens);
}

/// One layer by hand: the int8 product equals the f32 product with the dequantised Q8_0
/// weight up to the inputs' own int8 rounding, the f32 weight is gone, and a layer of a width
/// Q8_0 cannot block is refused with the width named.
#[test]
fn one_layer_quantises_to_q8_0_and_drops_its_f32_weight() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.5, (48, 64), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, 48, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev).unwrap();
    let f32_layer = LinearLayer::new("fc", w.clone(), Some(b.clone()));
    let mut q = LinearLayer::new("fc", w.clone(), Some(b));
    q.pack_int8().unwrap();
    assert!(q.is_int8());
    assert_eq!(q.weight().dims(), &[48, 64]);
    assert_eq!(q.weight().stride(), &[0, 0], "the f32 weight holds no data");
    let deq = q.int8_weight().unwrap().unwrap();
    // Q8_0: step d = max |w| of the block of 32 / 127, stored as f16 (relative error up to
    // 2^-11), so each weight is within d / 2 + 127 d 2^-11 of the original.
    let (wv, dv): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (w.to_vec2().unwrap(), deq.to_vec2().unwrap());
    let mut any_error = false;
    for (wr, dr) in wv.iter().zip(&dv) {
        for (wb, db) in wr.chunks(INT8_BLOCK).zip(dr.chunks(INT8_BLOCK)) {
            let d = wb.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            let bound = d * (0.5 + 127.0 / 2048.0) + 1e-6;
            for (a, b) in wb.iter().zip(db) {
                assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
                any_error |= a != b;
            }
        }
    }
    assert!(any_error, "the dequantised weight equals the f32 one");
    let want = f32_layer.forward(&x).unwrap();
    let got = q.forward(&x).unwrap();
    assert_eq!(got.dims(), &[2, 5, 48]);
    let d = max_abs_diff(&got, &want);
    let scale = max_abs(&want);
    assert!(d > 0.0 && d < 0.02 * scale, "max |diff| {d} of {scale}");
    // A new weight is quantised again.
    q.set_weight((w * 2.0).unwrap()).unwrap();
    let d2 = max_abs_diff(&q.forward(&x).unwrap(), &(f32_layer.forward(&x).unwrap()));
    assert!(d2 > 0.5 * scale, "set_weight was ignored: {d2}");

    let odd = Tensor::randn(0f32, 1.0, (8, 40), &dev).unwrap();
    let e = LinearLayer::new("odd", odd, None)
        .pack_int8()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("odd") && e.contains("40") && e.contains("32"),
        "{e}"
    );
    // Gradients cannot flow through an int8 product: refused, not silently zero.
    let v = Var::from_tensor(&x).unwrap();
    let e = q.forward(v.as_tensor()).unwrap_err().to_string();
    assert!(e.contains("no backward pass"), "{e}");
}

#[test]
fn trainable_models_are_refused_and_left_unchanged() {
    let mut m = load_model_dir(
        &fixture("clip"),
        &LoadOptions {
            mode: LoadMode::Trainable(VarMap::new()),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let e = m.model.pack_linear_int8().unwrap_err().to_string();
    assert!(e.contains("trainable"), "{e}");
    assert!(m.model.linear_layers().iter().all(|l| !l.is_int8()));
}
