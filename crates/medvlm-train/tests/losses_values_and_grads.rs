//! Contrastive losses: values on tiny inputs computed by hand, and gradients checked against
//! central finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};
use medvlm_train::losses::{
    class_similarity_targets, clip_loss, label_aware_clip_loss, label_similarity_targets,
    siglip_loss, CLIP_LOGIT_SCALE_MAX, SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn t2(v: &[f64], rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).unwrap()
}

fn scalar(v: f64) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn value(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} != {b} (tol {tol})");
}

#[test]
fn clip_loss_2x2_by_hand() {
    // image rows e0, e1; text rows e0, (e0+e1)/sqrt2 (normalised inside the loss from [1,1]).
    // cosines: [[1, r], [0, r]] with r = 1/sqrt2; scale exp(0) = 1.
    let img = t2(&[1.0, 0.0, 0.0, 2.0], 2, 2); // second row has norm 2: normalisation matters
    let txt = t2(&[3.0, 0.0, 1.0, 1.0], 2, 2);
    let r = std::f64::consts::FRAC_1_SQRT_2;
    let e = f64::exp;
    let i2t = (-(e(1.0) / (e(1.0) + e(r))).ln() - (e(r) / (1.0 + e(r))).ln()) / 2.0;
    let t2i = (-(e(1.0) / (e(1.0) + 1.0)).ln() + 2f64.ln()) / 2.0;
    let expected = (i2t + t2i) / 2.0;
    let got = value(&clip_loss(&img, &txt, &scalar(0.0)).unwrap());
    close(got, expected, 1e-12);
    // logit scale 10 is clamped to ln 100: identical embeddings -> loss = ln(1 + e^-100) ~ e^-100
    let eye = t2(&[1.0, 0.0, 0.0, 1.0], 2, 2);
    let got = value(&clip_loss(&eye, &eye, &scalar(10.0)).unwrap());
    close(got, (1.0 + (-100f64).exp()).ln(), 1e-50);
    let got = value(&clip_loss(&eye, &eye, &scalar(1.0f64.ln())).unwrap());
    close(got, (1.0 + (-1f64).exp()).ln(), 1e-12);
    assert!(clip_loss(&eye, &t2(&[1.0; 6], 3, 2), &scalar(0.0)).is_err());
}

#[test]
fn siglip_loss_2x2_by_hand() {
    // Orthonormal pairs, t = 10, b = -10: diagonal logits 0, off-diagonal -10.
    // L = -(1/2) [2 log s(0) + 2 log s(10)] = ln 2 + ln(1 + e^-10)
    let eye = t2(&[1.0, 0.0, 0.0, 1.0], 2, 2);
    let got = siglip_loss(
        &eye,
        &eye,
        &scalar(SIGLIP_LOGIT_SCALE_INIT),
        &scalar(SIGLIP_LOGIT_BIAS_INIT),
    )
    .unwrap();
    close(value(&got), 2f64.ln() + (1.0 + (-10f64).exp()).ln(), 1e-12);
    // Large logits stay finite (stable log-sigmoid): t = e^10, b = 0, off-diagonal cos 0.
    let got = siglip_loss(&eye, &eye, &scalar(10.0), &scalar(0.0)).unwrap();
    // diag log s(e^10) ~ 0, off-diag log s(0) = -ln2 (x2) -> L = ln 2
    close(value(&got), 2f64.ln(), 1e-12);
}

#[test]
fn label_aware_targets_and_values_3x3() {
    // labels: sample 0 {A}, sample 1 {A, B}, sample 2 {} (no finding)
    let labels = t2(&[1.0, 0.0, 1.0, 1.0, 0.0, 0.0], 3, 2);
    let p = label_similarity_targets(&labels).unwrap();
    let p: Vec<Vec<f64>> = p.to_vec2().unwrap();
    let c = std::f64::consts::FRAC_1_SQRT_2; // cos({A}, {A,B})
    close(p[0][0], 1.0 / (1.0 + c), 1e-12);
    close(p[0][1], c / (1.0 + c), 1e-12);
    close(p[0][2], 0.0, 1e-12);
    close(p[2][2], 1.0, 1e-12);

    // Classes [0, 0, 1]: P = [[.5,.5,0],[.5,.5,0],[0,0,1]]
    let p = class_similarity_targets(&[0, 0, 1], DType::F64, &Device::Cpu).unwrap();
    assert_eq!(
        p.to_vec2::<f64>().unwrap(),
        vec![
            vec![0.5, 0.5, 0.0],
            vec![0.5, 0.5, 0.0],
            vec![0.0, 0.0, 1.0]
        ]
    );
    // 3x3 value with orthonormal embeddings, scale 1: logits = I.
    // rows 0,1: -(0.5 ln q_same + 0.5 ln q_other), q(diag) = e/(e+2), q(off) = 1/(e+2)
    // row 2: -ln(e/(e+2)); symmetric so both directions are equal.
    let eye = Tensor::eye(3, DType::F64, &Device::Cpu).unwrap();
    let e = std::f64::consts::E;
    let qd = (e / (e + 2.0)).ln();
    let qo = (1.0 / (e + 2.0)).ln();
    let expected = (2.0 * -(0.5 * qd + 0.5 * qo) - qd) / 3.0;
    let got = label_aware_clip_loss(&eye, &eye, &scalar(0.0), &p).unwrap();
    close(value(&got), expected, 1e-12);
    // Distinct labels: equals the CLIP loss exactly.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let v: Vec<f64> = (0..12).map(|_| rng.random::<f64>() - 0.5).collect();
    let (img, txt) = (t2(&v[..6], 3, 2), t2(&v[6..], 3, 2));
    let ident = class_similarity_targets(&[0, 1, 2], DType::F64, &Device::Cpu).unwrap();
    close(
        value(&label_aware_clip_loss(&img, &txt, &scalar(0.7), &ident).unwrap()),
        value(&clip_loss(&img, &txt, &scalar(0.7)).unwrap()),
        1e-12,
    );
}

/// Compares autograd gradients of `loss(vars)` with central differences.
fn grad_check(vars: &[Var], loss: &dyn Fn(&[Tensor]) -> Tensor) {
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&inputs).backward().unwrap();
    let h = 1e-6;
    for (k, var) in vars.iter().enumerate() {
        let auto: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("gradient exists")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.as_tensor().shape().clone();
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut ins: Vec<Tensor> = vars.iter().map(|v| v.as_detached_tensor()).collect();
                ins[k] = Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap();
                value(&loss(&ins))
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (numeric - auto[i]).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "input {k} element {i}: autograd {} vs finite difference {numeric}",
                auto[i]
            );
        }
    }
}

fn random_var(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Var {
    let v: Vec<f64> = (0..rows * cols)
        .map(|_| rng.random::<f64>() * 2.0 - 1.0)
        .collect();
    Var::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

#[test]
fn clip_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vars = [
        random_var(&mut rng, 3, 4),
        random_var(&mut rng, 3, 4),
        Var::new(1.3f64, &Device::Cpu).unwrap(),
    ];
    grad_check(&vars, &|t| clip_loss(&t[0], &t[1], &t[2]).unwrap());
}

#[test]
fn clip_scale_gradient_is_zero_when_clamped() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (a, b) = (random_var(&mut rng, 3, 4), random_var(&mut rng, 3, 4));
    let s = Var::new(CLIP_LOGIT_SCALE_MAX + 1.0, &Device::Cpu).unwrap();
    let g = clip_loss(a.as_tensor(), b.as_tensor(), s.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(value(g.get(s.as_tensor()).unwrap()), 0.0);
}

#[test]
fn siglip_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let vars = [
        random_var(&mut rng, 3, 4),
        random_var(&mut rng, 3, 4),
        Var::new(0.8f64, &Device::Cpu).unwrap(),
        Var::new(-1.5f64, &Device::Cpu).unwrap(),
    ];
    grad_check(&vars, &|t| siglip_loss(&t[0], &t[1], &t[2], &t[3]).unwrap());
}

#[test]
fn label_aware_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let labels = t2(&[1.0, 0.0, 1.0, 1.0, 0.0, 1.0], 3, 2);
    let targets = label_similarity_targets(&labels).unwrap();
    let vars = [
        random_var(&mut rng, 3, 4),
        random_var(&mut rng, 3, 4),
        Var::new(0.5f64, &Device::Cpu).unwrap(),
    ];
    grad_check(&vars, &|t| {
        label_aware_clip_loss(&t[0], &t[1], &t[2], &targets).unwrap()
    });
}

#[test]
fn contrastive_head_matches_the_free_functions() {
    use medvlm_train::losses::{ContrastiveHead, LossKind, CLIP_LOGIT_SCALE_INIT};
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (img, txt) = (random_var(&mut rng, 3, 4), random_var(&mut rng, 3, 4));
    let (img, txt) = (img.as_tensor(), txt.as_tensor());

    let clip = ContrastiveHead::new(
        LossKind::Clip,
        CLIP_LOGIT_SCALE_INIT,
        0.0,
        true,
        DType::F64,
        &dev,
    )
    .unwrap();
    assert_eq!(clip.trainable_vars().len(), 1);
    close(
        value(&clip.loss(img, txt, None).unwrap()),
        value(&clip_loss(img, txt, &scalar(CLIP_LOGIT_SCALE_INIT)).unwrap()),
        1e-12,
    );
    let sig = ContrastiveHead::new(
        LossKind::Siglip,
        SIGLIP_LOGIT_SCALE_INIT,
        SIGLIP_LOGIT_BIAS_INIT,
        true,
        DType::F64,
        &dev,
    )
    .unwrap();
    let names: Vec<String> = sig.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["logit_scale", "logit_bias"]);
    close(
        value(&sig.loss(img, txt, None).unwrap()),
        value(
            &siglip_loss(
                img,
                txt,
                &scalar(SIGLIP_LOGIT_SCALE_INIT),
                &scalar(SIGLIP_LOGIT_BIAS_INIT),
            )
            .unwrap(),
        ),
        1e-12,
    );
    // Label-aware needs targets.
    let la = ContrastiveHead::new(LossKind::LabelAware, 0.0, 0.0, true, DType::F64, &dev).unwrap();
    assert!(la.loss(img, txt, None).is_err());
    let targets = class_similarity_targets(&[0, 0, 1], DType::F64, &dev).unwrap();
    assert!(la.loss(img, txt, Some(&targets)).is_ok());

    // Fixed temperature: no trainable vars and no gradient reaches the scale.
    let fixed = ContrastiveHead::new(LossKind::Clip, 1.0, 0.0, false, DType::F64, &dev).unwrap();
    assert!(fixed.trainable_vars().is_empty());
    let g = fixed.loss(img, txt, None).unwrap().backward().unwrap();
    assert!(g.get(fixed.logit_scale().as_tensor()).is_none());

    // In-place clamp into [0, ln 100].
    let big = ContrastiveHead::new(LossKind::Clip, 7.0, 0.0, true, DType::F64, &dev).unwrap();
    big.clamp_logit_scale().unwrap();
    close(
        value(big.logit_scale().as_tensor()),
        CLIP_LOGIT_SCALE_MAX,
        1e-15,
    );
    let neg = ContrastiveHead::new(LossKind::Clip, -1.0, 0.0, true, DType::F64, &dev).unwrap();
    neg.clamp_logit_scale().unwrap();
    assert_eq!(value(neg.logit_scale().as_tensor()), 0.0);
}
