//! Three AdamW steps against torch.optim.AdamW (fixture from tools/make_engine_reference.py).

use candle_core::{Device, Tensor, Var};
use medvlm_train::optim::{AdamW, AdamWConfig, Gradients, WeightDecayRule};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/engine_reference.json");

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn adamw_matches_torch() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    let a = &fixture["adamw"];
    let betas = floats(&a["betas"]);
    let cfg = AdamWConfig {
        beta1: betas[0],
        beta2: betas[1],
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
    };
    let lr = a["lr"].as_f64().unwrap();
    let dev = Device::Cpu;
    let p = Var::from_vec(floats(&a["init"]), (2, 3), &dev).unwrap();
    let mut opt = AdamW::new(
        vec![("w.weight".into(), p.clone())],
        cfg,
        &WeightDecayRule::default(),
    )
    .unwrap();
    let grads = a["grads"].as_array().unwrap();
    let after = a["after_each_step"].as_array().unwrap();
    assert_eq!(grads.len(), 3);
    for (step, (g, want)) in grads.iter().zip(after).enumerate() {
        let g = Tensor::from_vec(floats(g), (2, 3), &dev).unwrap();
        let mut gs = Gradients::default();
        gs.0.insert("w.weight".into(), g);
        opt.step(&gs, lr).unwrap();
        let got: Vec<f64> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for (i, (x, y)) in got.iter().zip(floats(want)).enumerate() {
            assert!(
                (x - y).abs() <= 1e-12,
                "step {step} element {i}: {x} vs torch {y}"
            );
        }
    }
}
