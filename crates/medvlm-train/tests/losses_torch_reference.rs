//! CLIP and SigLIP losses and their gradients against open_clip's loss classes with torch
//! autograd (fixture from tools/make_engine_reference.py).

use candle_core::{Device, Tensor, Var};
use medvlm_train::losses::{clip_loss, siglip_loss};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/engine_reference.json");

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-10 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs torch {w}"
        );
    }
}

fn grad_of(g: &candle_core::backprop::GradStore, v: &Var) -> Vec<f64> {
    g.get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

struct Case {
    img: Var,
    txt: Var,
    scale: Var,
}

fn case(c: &Value) -> Case {
    let n = c["n"].as_u64().unwrap() as usize;
    let d = c["d"].as_u64().unwrap() as usize;
    let dev = Device::Cpu;
    Case {
        img: Var::from_vec(floats(&c["image"]), (n, d), &dev).unwrap(),
        txt: Var::from_vec(floats(&c["text"]), (n, d), &dev).unwrap(),
        scale: Var::from_tensor(&Tensor::new(c["logit_scale"].as_f64().unwrap(), &dev).unwrap())
            .unwrap(),
    }
}

#[test]
fn clip_loss_matches_open_clip() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    let cases = fixture["clip"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let k = case(c);
        let loss = clip_loss(k.img.as_tensor(), k.txt.as_tensor(), k.scale.as_tensor()).unwrap();
        assert_close(
            "clip loss",
            &[loss.to_scalar::<f64>().unwrap()],
            &[c["loss"].as_f64().unwrap()],
        );
        let g = loss.backward().unwrap();
        assert_close(
            "clip grad image",
            &grad_of(&g, &k.img),
            &floats(&c["grad_image"]),
        );
        assert_close(
            "clip grad text",
            &grad_of(&g, &k.txt),
            &floats(&c["grad_text"]),
        );
        assert_close(
            "clip grad logit_scale",
            &grad_of(&g, &k.scale),
            &[c["grad_logit_scale"].as_f64().unwrap()],
        );
    }
}

#[test]
fn siglip_loss_matches_open_clip() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    let cases = fixture["siglip"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for c in cases {
        let k = case(c);
        let bias = Var::from_tensor(
            &Tensor::new(c["logit_bias"].as_f64().unwrap(), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let loss = siglip_loss(
            k.img.as_tensor(),
            k.txt.as_tensor(),
            k.scale.as_tensor(),
            bias.as_tensor(),
        )
        .unwrap();
        assert_close(
            "siglip loss",
            &[loss.to_scalar::<f64>().unwrap()],
            &[c["loss"].as_f64().unwrap()],
        );
        let g = loss.backward().unwrap();
        assert_close(
            "siglip grad image",
            &grad_of(&g, &k.img),
            &floats(&c["grad_image"]),
        );
        assert_close(
            "siglip grad text",
            &grad_of(&g, &k.txt),
            &floats(&c["grad_text"]),
        );
        assert_close(
            "siglip grad scale",
            &grad_of(&g, &k.scale),
            &[c["grad_logit_scale"].as_f64().unwrap()],
        );
        assert_close(
            "siglip grad bias",
            &grad_of(&g, &bias),
            &[c["grad_logit_bias"].as_f64().unwrap()],
        );
    }
}
