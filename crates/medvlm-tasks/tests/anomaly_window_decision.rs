//! A detector that decides with WinCLIP+'s window memory (`--decide-with window-memory`) on
//! the random-weight CLIP fixture: its threshold is the window memory's on the calibration
//! normals, `predict` scores files with the window memory (the calibration normals
//! themselves are called anomalous at no more than the target rate, which holds only when
//! prediction computes the maps calibration computed), the choice survives save and load,
//! and a tower without windows cannot be asked for it. Also the weakly supervised window
//! scorer (`weak_steps`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use medvlm_phantoms::Modality;
use medvlm_tasks::anomaly_pipeline::{
    fit, AnomalyDetector, AnomalyOptions, AnomalyTask, DecisionMethod,
};

mod common;
use common::{fixture, model};

fn phantoms(dir: &Path) -> PathBuf {
    common::anomaly_phantoms(dir, 60, 31, vec![Modality::Dermoscopy], 0.5)
}

#[test]
fn window_memory_decides_at_its_own_threshold_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(&tmp.path().join("ph"));
    let task = AnomalyTask::from_manifest(&manifest, None).unwrap();
    let dev = Device::Cpu;
    let fpr = 0.2;
    let options = AnomalyOptions {
        shots: 3,
        fpr,
        decide_with: DecisionMethod::WindowMemory,
        ..Default::default()
    };
    let det = fit(model(), &fixture(), &task, None, &options, &dev).unwrap();
    let d = &det.modalities[0];
    assert!(d.decides_with_windows());
    let wt = d.window_threshold.expect("a window threshold");
    assert_eq!(d.decision_threshold(), &wt);
    assert_ne!(wt, d.threshold);
    // The calibration normals: the training normals outside the memory.
    let calib: Vec<PathBuf> = task
        .items
        .iter()
        .filter(|it| it.normal && !d.memory_images.contains(&it.item.image))
        .map(|it| it.item.image.clone())
        .collect();
    assert_eq!(wt.n_calibration, calib.len());
    let (images, predicted): (Vec<_>, Vec<_>) = det
        .predict_files(&calib, Some("dermoscopy"), &dev)
        .unwrap()
        .into_iter()
        .map(|(im, s, c)| (im, (s, c)))
        .unzip();
    let called = predicted.iter().filter(|(_, c)| *c).count();
    assert!(
        called as f64 <= fpr * calib.len() as f64,
        "{called} of {} calibration normals called anomalous",
        calib.len()
    );
    // The scores are the window memory's, not the patch memory's.
    let by_memory = det.score_memory(d, &images).unwrap();
    assert!(predicted
        .iter()
        .zip(&by_memory)
        .any(|((s, _), m)| (s.score - m.score).abs() > 1e-4));

    let dir = tmp.path().join("det");
    det.save(&dir).unwrap();
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("anomaly.json")).unwrap()).unwrap();
    assert_eq!(card["options"]["decide_with"], "window-memory");
    let loaded = AnomalyDetector::load(&dir, None, &dev).unwrap();
    let again = loaded
        .predict_files(&calib, Some("dermoscopy"), &dev)
        .unwrap();
    for ((a, ca), (_, b, cb)) in predicted.iter().zip(&again) {
        assert_eq!(a.score, b.score);
        assert_eq!(ca, cb);
    }
    // A detector that decides with windows but lost its window memory is refused on load.
    let tensors = candle_core::safetensors::load(dir.join("memory.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.contains("window_memory"))
        .collect::<std::collections::HashMap<_, _>>();
    candle_core::safetensors::save(&tensors, dir.join("memory.safetensors")).unwrap();
    let err = AnomalyDetector::load(&dir, None, &dev)
        .err()
        .expect("no window memory")
        .to_string();
    assert!(err.contains("no window memory"), "{err}");
}

#[test]
fn a_tower_without_windows_cannot_decide_with_them() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(&tmp.path().join("ph"));
    let task = AnomalyTask::from_manifest(&manifest, None).unwrap();
    // SigLIP pools with an attention head: patch tokens, but no windows.
    let siglip = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures/siglip")
        .display()
        .to_string();
    let m = medvlm_models::load_model(&siglip, &Default::default()).unwrap();
    let options = AnomalyOptions {
        shots: 3,
        decide_with: DecisionMethod::WindowMemory,
        ..Default::default()
    };
    let err = fit(m, &siglip, &task, None, &options, &Device::Cpu)
        .err()
        .expect("no windows")
        .to_string();
    assert!(err.contains("encodes them"), "{err}");
}

/// `weak_steps`: a window scorer trained from the image labels moves off its zero-shot
/// start, is evaluated, and is saved and loaded back as it was; a detector that lost it is
/// refused.
#[test]
fn weak_window_scorer_trains_evaluates_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(&tmp.path().join("ph"));
    let task = AnomalyTask::from_manifest(&manifest, None).unwrap();
    let dev = Device::Cpu;
    let options = AnomalyOptions {
        shots: 3,
        fpr: 0.2,
        weak_steps: 40,
        ..Default::default()
    };
    let det = fit(model(), &fixture(), &task, None, &options, &dev).unwrap();
    let d = &det.modalities[0];
    let weak = d.weak.as_ref().expect("a weak scorer");
    let wt = det.card.modalities[0]
        .weak_training
        .expect("its training in the card");
    assert_eq!(wt.n_images, task.items.len());
    assert_eq!(
        wt.n_abnormal,
        task.items.iter().filter(|it| !it.normal).count()
    );
    assert!(wt.final_loss.is_finite() && wt.final_loss > 0.0);
    let text = d.zero_shot_text.as_ref().unwrap();
    let scale = medvlm_tasks::winclip::logit_scale(det.model().model.as_ref()).unwrap();
    let start = medvlm_tasks::window_mil::zero_shot_direction(text, scale).unwrap();
    let moved = (&weak.direction - &start)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-3, "the scorer did not train ({moved})");
    let e = det.evaluate(&task, &dev).unwrap();
    let w = e.modalities[0].window_weak.as_ref().expect("weak metrics");
    for v in [w.image_auroc, w.pixel_auroc, w.aupro] {
        let v = v.expect("a metric");
        assert!((0.0..=1.0).contains(&v), "{v}");
    }
    assert!(e.render_table().contains("Weakly supervised window scorer"));

    let dir = tmp.path().join("det");
    det.save(&dir).unwrap();
    let loaded = AnomalyDetector::load(&dir, None, &dev).unwrap();
    let lw = loaded.modalities[0].weak.as_ref().unwrap();
    assert_eq!(
        lw.direction.to_vec1::<f32>().unwrap(),
        weak.direction.to_vec1::<f32>().unwrap()
    );
    let again = loaded.evaluate(&task, &dev).unwrap();
    assert_eq!(
        again.modalities[0]
            .window_weak
            .as_ref()
            .unwrap()
            .pixel_auroc,
        w.pixel_auroc
    );
    let tensors = candle_core::safetensors::load(dir.join("memory.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.contains("weak"))
        .collect::<std::collections::HashMap<_, _>>();
    candle_core::safetensors::save(&tensors, dir.join("memory.safetensors")).unwrap();
    let err = AnomalyDetector::load(&dir, None, &dev)
        .err()
        .expect("no weak scorer")
        .to_string();
    assert!(err.contains("weak_direction"), "{err}");
}

#[test]
fn without_window_scales_there_is_no_window_memory_to_decide_with() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(&tmp.path().join("ph"));
    let task = AnomalyTask::from_manifest(&manifest, None).unwrap();
    let no_windows = medvlm_tasks::winclip::WindowConfig {
        scales: Vec::new(),
        stride: 1,
    };
    let options = AnomalyOptions {
        shots: 3,
        windows: no_windows.clone(),
        ..Default::default()
    };
    let det = fit(model(), &fixture(), &task, None, &options, &Device::Cpu).unwrap();
    assert!(det.modalities[0].window_memory.is_none());
    assert!(det.modalities[0].window_threshold.is_none());
    let dir = tmp.path().join("det");
    det.save(&dir).unwrap();
    let loaded = AnomalyDetector::load(&dir, None, &Device::Cpu).unwrap();
    assert!(loaded.modalities[0].window_memory.is_none());
    for options in [
        AnomalyOptions {
            shots: 3,
            windows: no_windows.clone(),
            decide_with: DecisionMethod::WindowMemory,
            ..Default::default()
        },
        AnomalyOptions {
            shots: 3,
            windows: no_windows.clone(),
            weak_steps: 5,
            ..Default::default()
        },
    ] {
        let err = fit(model(), &fixture(), &task, None, &options, &Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("window scales"), "{err}");
    }
}
