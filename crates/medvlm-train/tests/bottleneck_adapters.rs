//! Bottleneck adapters (Houlsby et al. 2019) on the CLIP parity fixture's image tower: they
//! start as the identity, compute `y + up(GELU(down(y)))` on the layers they wrap, switch off
//! to the base model exactly, receive gradients, and survive a save / load onto a fresh
//! model bit for bit; settings and files that cannot work are refused.

use std::path::PathBuf;
use std::sync::Arc;

mod support;
use support::max_abs_diff;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LinearLayer, LinearWrapper, LoadOptions, LoadedModel};
use medvlm_train::bottleneck::{
    apply_bottleneck_adapters, bottleneck_adapters, load_bottleneck_adapters,
    save_bottleneck_adapters, set_bottleneck_enabled, AdapterSpec, BottleneckAdapter,
};
use medvlm_train::finetune::Towers;
use medvlm_train::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};

fn load() -> LoadedModel {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip");
    load_model_dir(&dir, &LoadOptions::default()).unwrap()
}

fn pixels() -> Tensor {
    Tensor::arange(0f32, (2 * 3 * 32 * 32) as f32, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 32, 32))
        .unwrap()
        .affine(1.0 / 3000.0, -1.0)
        .unwrap()
}

fn embeds(m: &LoadedModel) -> Tensor {
    m.model.encode_image(&pixels()).unwrap().embeds
}

/// Fills every `adapter_up` parameter with a seeded non-zero draw, so the adapters act.
fn perturb(vm: &VarMap) {
    let data = vm.data().lock().unwrap();
    for (i, (name, var)) in data.iter().enumerate() {
        if name.contains("adapter_up") {
            let t = Tensor::randn(0f32, 0.5, var.as_tensor().shape(), &Device::Cpu).unwrap();
            var.set(&(t + i as f64 * 1e-3).unwrap()).unwrap();
        }
    }
}

#[test]
fn fresh_adapters_are_the_identity_and_act_once_trained() {
    let base = embeds(&load());
    let mut m = load();
    let vm = VarMap::new();
    let params =
        apply_bottleneck_adapters(m.model.as_mut(), &AdapterSpec::default(), &vm, 7).unwrap();
    // Two image-tower blocks, `out` and `fc2` in each: four adapters of four tensors.
    assert_eq!(bottleneck_adapters(m.model.as_ref()).len(), 4);
    assert_eq!(params.len(), 16);
    assert!(params
        .iter()
        .any(|(n, _)| n == "vision_model.encoder.layers.1.mlp.fc2.adapter_up.weight"));
    assert!(params.iter().all(|(n, _)| n.starts_with("vision_model.")));
    // (A wrapped layer takes the unfused path: equal up to rounding.)
    assert!(max_abs_diff(&embeds(&m), &base) < 1e-5);
    perturb(&vm);
    let adapted = embeds(&m);
    assert!(max_abs_diff(&adapted, &base) > 1e-3);
    // Off: the base model exactly; on again: the adapted outputs.
    assert_eq!(set_bottleneck_enabled(m.model.as_ref(), false), 4);
    assert!(max_abs_diff(&embeds(&m), &base) < 1e-5);
    set_bottleneck_enabled(m.model.as_ref(), true);
    assert_eq!(max_abs_diff(&embeds(&m), &adapted), 0.0);
}

#[test]
fn an_adapter_computes_y_plus_up_gelu_down_y() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
    let mut layer = LinearLayer::new("blk.fc2", w.clone(), Some(b.clone()));
    let dw = Tensor::randn(0f32, 1.0, (3, 6), &dev).unwrap();
    let db = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
    let uw = Tensor::randn(0f32, 1.0, (6, 3), &dev).unwrap();
    let ub = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
    let a = BottleneckAdapter::from_tensors("blk.fc2", &dw, &db, &uw, &ub).unwrap();
    assert_eq!(a.kind(), "bottleneck");
    layer.push_wrapper(Arc::new(a));
    let x = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
    let got = layer.forward(&x).unwrap();
    // By hand, elementwise GELU (erf form) from its definition.
    let y = x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let h: Vec<f32> = y
        .matmul(&dw.t().unwrap())
        .unwrap()
        .broadcast_add(&db)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let erf = |v: f64| {
        // erf by the midpoint rule (an independent path from candle's erf).
        let n = 4000;
        let step = v / n as f64;
        (0..n)
            .map(|i| {
                let t = (i as f64 + 0.5) * step;
                (-t * t).exp() * step
            })
            .sum::<f64>()
            * 2.0
            / std::f64::consts::PI.sqrt()
    };
    let g: Vec<f32> = h
        .iter()
        .map(|&v| (0.5 * v as f64 * (1.0 + erf(v as f64 / 2f64.sqrt()))) as f32)
        .collect();
    let g = Tensor::from_vec(g, (4, 3), &dev).unwrap();
    let want = (&y
        + g.matmul(&uw.t().unwrap())
            .unwrap()
            .broadcast_add(&ub)
            .unwrap())
    .unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-4,
        "{}",
        max_abs_diff(&got, &want)
    );
}

#[test]
fn adapters_receive_gradients() {
    let mut m = load();
    let vm = VarMap::new();
    let params =
        apply_bottleneck_adapters(m.model.as_mut(), &AdapterSpec::default(), &vm, 1).unwrap();
    let loss = embeds(&m).sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    // At the start W_up = 0, so the gradient reaches W_up and b_up (not yet W_down).
    for (name, var) in &params {
        let g = grads.get(var.as_tensor());
        if name.contains("adapter_up") {
            let g = g.unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{name}: zero gradient");
        }
    }
}

#[test]
fn saved_adapters_reload_onto_a_fresh_model_and_bad_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load();
    let vm = VarMap::new();
    let spec = AdapterSpec {
        bottleneck: 5,
        targets: vec!["fc2".into()],
        towers: Towers::Vision,
    };
    apply_bottleneck_adapters(m.model.as_mut(), &spec, &vm, 3).unwrap();
    perturb(&vm);
    let want = embeds(&m);
    let dir = tmp.path().join("adapter");
    assert_eq!(
        save_bottleneck_adapters(m.model.as_ref(), &spec, &dir).unwrap(),
        2
    );
    assert!(dir.join(ADAPTER_CONFIG).is_file() && dir.join(ADAPTER_WEIGHTS).is_file());
    let mut fresh = load();
    let (read, params) =
        load_bottleneck_adapters(fresh.model.as_mut(), &dir, &VarMap::new()).unwrap();
    assert_eq!(read, spec);
    assert_eq!(params.len(), 8);
    assert_eq!(max_abs_diff(&embeds(&fresh), &want), 0.0);
    // Loading twice onto one model: refused, the model unchanged.
    let err = load_bottleneck_adapters(fresh.model.as_mut(), &dir, &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already carries"), "{err}");
    assert_eq!(max_abs_diff(&embeds(&fresh), &want), 0.0);
    // A config whose width disagrees with the tensors: refused, naming the file.
    let cfg = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap();
    std::fs::write(
        dir.join(ADAPTER_CONFIG),
        cfg.replace("\"bottleneck\": 5", "\"bottleneck\": 4"),
    )
    .unwrap();
    let mut other = load();
    let err = load_bottleneck_adapters(other.model.as_mut(), &dir, &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config says 4") && err.contains(ADAPTER_WEIGHTS),
        "{err}"
    );
    assert!(bottleneck_adapters(other.model.as_ref()).is_empty());
    // A LoRA folder is not a bottleneck adapter.
    std::fs::write(dir.join(ADAPTER_CONFIG), r#"{"peft_type": "LORA", "r": 2}"#).unwrap();
    let err = load_bottleneck_adapters(other.model.as_mut(), &dir, &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a bottleneck adapter"), "{err}");
    // Nothing to save.
    let err = save_bottleneck_adapters(other.model.as_ref(), &spec, &tmp.path().join("none"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no bottleneck adapter"), "{err}");
}

#[test]
fn settings_that_cannot_work_are_refused_before_touching_the_model() {
    let mut m = load();
    let vm = VarMap::new();
    let bad = |spec: AdapterSpec, m: &mut LoadedModel| {
        apply_bottleneck_adapters(m.model.as_mut(), &spec, &vm, 0)
            .unwrap_err()
            .to_string()
    };
    let e = bad(
        AdapterSpec {
            bottleneck: 0,
            ..Default::default()
        },
        &mut m,
    );
    assert!(e.contains("adapter.bottleneck"), "{e}");
    let e = bad(
        AdapterSpec {
            targets: vec!["nonexistent".into()],
            ..Default::default()
        },
        &mut m,
    );
    assert!(e.contains("\"nonexistent\" matches no linear layer"), "{e}");
    // Wider than the fixture's 32-wide layers: refused (an absurd width would exhaust memory).
    let e = bad(
        AdapterSpec {
            bottleneck: 1_000_000_000,
            ..Default::default()
        },
        &mut m,
    );
    assert!(e.contains("at most the layer's width"), "{e}");
    assert!(bottleneck_adapters(m.model.as_ref()).is_empty());
    apply_bottleneck_adapters(m.model.as_mut(), &AdapterSpec::default(), &vm, 0).unwrap();
    let e = bad(AdapterSpec::default(), &mut m);
    assert!(e.contains("already carries a bottleneck adapter"), "{e}");
    assert_eq!(bottleneck_adapters(m.model.as_ref()).len(), 4);
}
