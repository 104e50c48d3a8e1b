//! The detection pipeline on files: bad boxes, unknown prompts and missing files give clear
//! errors, and the saved detector predicts exactly what the trained one did. On the tiny
//! CLIP parity fixture (random weights, 32 px, a 4x4 patch grid) and phantoms at 32 px.

use std::path::Path;

use candle_core::Device;

use medvlm_io::Plane;
use medvlm_phantoms::{DatasetConfig, Modality, StudyOptions};
use medvlm_tasks::detection_pipeline::{
    patch_grid, read_task, train_detector, DetPipelineError, Detector, TrainOptions,
};

mod common;
use common::{fixture, model};

fn phantoms(dir: &Path, n: u64, seed: u64, modalities: Vec<Modality>) {
    medvlm_phantoms::write_dataset(&DatasetConfig {
        out: dir.to_path_buf(),
        n,
        seed,
        modalities,
        options: StudyOptions {
            size: 32,
            max_findings: 1,
            normal_fraction: 0.1,
            registration: false,
            ..Default::default()
        },
        force: false,
    })
    .unwrap();
}

fn options(steps: usize) -> TrainOptions {
    TrainOptions {
        model_spec: fixture(),
        steps: Some(steps),
        batch: Some(16),
        width: Some(16),
        lr: None,
        seed: 3,
        split: None,
    }
}

fn grey_png(path: &Path, side: usize) {
    let plane = Plane::new(side, side, 1, vec![0.5; side * side]).unwrap();
    medvlm_io::raster::write_png(path, &plane).unwrap();
}

#[test]
fn bad_boxes_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    grey_png(&d.join("a.png"), 32);
    let write = |name: &str, text: &str| {
        std::fs::write(d.join(name), text).unwrap();
        d.join(name)
    };
    // A box past the right edge of a 32x32 image.
    let m = write(
        "outside.jsonl",
        r#"{"image": "a.png", "boxes": [{"label": "nodule", "x0": 20, "y0": 4, "x1": 40, "y1": 9}]}"#,
    );
    let task = read_task(&m, None).unwrap();
    let err = match train_detector(model(), &task, &options(2), &Device::Cpu) {
        Err(e) => e,
        Ok(_) => panic!("a box outside the image was accepted"),
    };
    let msg = err.to_string();
    assert!(matches!(err, DetPipelineError::Box(_)), "{msg}");
    assert!(
        msg.contains("a.png") && msg.contains("outside the image") && msg.contains("32x32"),
        "{msg}"
    );
    // An empty box and a non-finite one fail at reading.
    let m = write(
        "empty.jsonl",
        r#"{"image": "a.png", "boxes": [{"label": "nodule", "x0": 5, "y0": 4, "x1": 5, "y1": 9}]}"#,
    );
    let msg = read_task(&m, None).unwrap_err().to_string();
    assert!(msg.contains("empty") && msg.contains("nodule"), "{msg}");
    // A missing image.
    let m = write(
        "gone.jsonl",
        r#"{"image": "gone.png", "boxes": [{"label": "nodule", "x0": 1, "y0": 1, "x1": 5, "y1": 9}]}"#,
    );
    let task = read_task(&m, None).unwrap();
    let msg = match train_detector(model(), &task, &options(2), &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing image was accepted"),
    };
    assert!(msg.contains("gone.png"), "{msg}");
    // A manifest without boxes: nothing to learn.
    let m = write("nobox.jsonl", r#"{"image": "a.png", "label": "normal"}"#);
    let task = read_task(&m, None).unwrap();
    let msg = match train_detector(model(), &task, &options(2), &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a manifest without boxes was accepted"),
    };
    assert!(msg.contains("no boxes"), "{msg}");
    // A missing manifest.
    let msg = read_task(&d.join("nope.jsonl"), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope.jsonl"), "{msg}");
    // A tower without a grid of patch tokens (one pooled vector) or a non-square one.
    assert!(patch_grid(1)
        .unwrap_err()
        .to_string()
        .contains("no spatial features"));
    assert!(patch_grid(12).is_err());
    assert_eq!(patch_grid(64).unwrap(), (8, 8));
}

#[test]
fn saved_detector_predicts_the_same_boxes_and_refuses_unknown_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(
        &data,
        24,
        5,
        vec![Modality::Dermoscopy, Modality::ChestXray],
    );
    let task = read_task(&data.join("manifest.jsonl"), None).unwrap();
    let trained = train_detector(model(), &task, &options(20), &Device::Cpu).unwrap();
    let det = trained.detector;
    assert!(det.card.n_train_boxes > 0 && !det.card.classes.is_empty());
    let out = dir.path().join("det");
    det.save(&out).unwrap();
    let (loaded, warning) = Detector::load(&out, None, &Device::Cpu).unwrap();
    assert!(warning.is_none(), "{warning:?}");
    assert_eq!(loaded.card, det.card);

    // Identical token boxes and scores for every class on every image.
    let planes: Vec<Plane> = task
        .items
        .iter()
        .map(|it| medvlm_tasks::segmentation_pipeline::read_plane(&it.image).unwrap())
        .collect();
    for cls in &det.card.classes {
        let (t1, c1) = det
            .prompt_embedding(&cls.name, false, &Device::Cpu)
            .unwrap();
        let (t2, _) = loaded
            .prompt_embedding(&cls.name, false, &Device::Cpu)
            .unwrap();
        assert_eq!(c1.as_deref(), Some(cls.name.as_str()));
        let a = det.token_boxes(&planes, &t1, &Device::Cpu).unwrap();
        let b = loaded.token_boxes(&planes, &t2, &Device::Cpu).unwrap();
        assert_eq!(a, b, "class {}", cls.name);
    }
    // The same evaluation.
    let e1 = det.evaluate(&task, None, &Device::Cpu).unwrap();
    let e2 = loaded.evaluate(&task, None, &Device::Cpu).unwrap();
    assert_eq!(e1, e2);
    assert_eq!(e1.n_phrases, e1.grounding_centre.micro.n);
    assert!(e1.render_table().contains("all, macro over classes"));

    // A class with no boxes in training (brain MRI was not generated) is refused, naming the
    // known classes; free text is embedded when asked for.
    let err = loaded
        .prompt_embedding("brain_mri/tumour", false, &Device::Cpu)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, DetPipelineError::UnknownClass { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("brain_mri/tumour") && msg.contains(&det.card.classes[0].name),
        "{msg}"
    );
    assert!(loaded
        .prompt_embedding("brain_mri/tumour", true, &Device::Cpu)
        .is_ok());

    // Prediction on a file writes the overlay and the JSON; a missing file is named.
    let pred_dir = dir.path().join("pred");
    let name = det.card.classes[0].name.clone();
    let (text, _) = loaded.prompt_embedding(&name, false, &Device::Cpu).unwrap();
    let rec = loaded
        .predict_file(&task.items[0].image, &text, 0.0, 2, &pred_dir, &Device::Cpu)
        .unwrap();
    assert!(rec.volume.is_none());

    // A NIfTI volume of 4 identical slices across z is boxed slice by slice: every slice
    // gives what the same image as a one-slice NIfTI gives, and the grounded 3-D box spans
    // all four slices with the 2-D box's pixels.
    let plane = medvlm_tasks::segmentation_pipeline::read_plane(&task.items[0].image).unwrap();
    let (h, w) = (plane.rows, plane.cols);
    let grey: Vec<f32> = plane
        .data
        .chunks(plane.channels)
        .map(|px| px.iter().sum::<f32>() / px.len() as f32)
        .collect();
    let affine = medvlm_io::volume::affine_from_spacing([1.0, 1.0, 2.5]);
    let flat = dir.path().join("one.nii.gz");
    medvlm_io::volume::write_nifti1(&flat, &grey, &[h, w, 1], &affine).unwrap();
    let depth = 4;
    let mut vol = vec![0f32; h * w * depth];
    for x in 0..h {
        for y in 0..w {
            for z in 0..depth {
                vol[(x * w + y) * depth + z] = grey[x * w + y];
            }
        }
    }
    let stack = dir.path().join("stack.nii.gz");
    medvlm_io::volume::write_nifti1(&stack, &vol, &[h, w, depth], &affine).unwrap();
    let one = loaded
        .predict_file(&flat, &text, 0.0, 2, &pred_dir, &Device::Cpu)
        .unwrap();
    let three = loaded
        .predict_file(&stack, &text, 0.0, 2, &pred_dir, &Device::Cpu)
        .unwrap();
    let v = three.volume.as_ref().unwrap();
    assert_eq!((v.axis, v.per_slice.len(), v.best_slice), (2, depth, 0));
    for s in &v.per_slice {
        assert_eq!(s.grounding, one.grounding);
    }
    let g = one.grounding.bbox;
    assert_eq!(v.grounding.min[2], 0);
    assert_eq!(v.grounding.max[2], depth - 1);
    // Rows of the plane are NIfTI x, columns y.
    assert_eq!(v.grounding.min[0], g[1].floor() as usize);
    assert_eq!(v.grounding.min[1], g[0].floor() as usize);
    assert_eq!(v.grounding.max[0], (g[3].ceil() as usize - 1).min(h - 1));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&three.json).unwrap()).unwrap();
    assert_eq!(json["volume"]["per_slice"].as_array().unwrap().len(), depth);
    assert!(loaded
        .predict_file(&stack, &text, 0.0, 3, &pred_dir, &Device::Cpu)
        .is_err());
    assert!(rec.overlay_png.is_file() && rec.json.is_file());
    let b = rec.grounding.bbox;
    assert!(
        b[0] >= 0.0 && b[2] <= 32.0 && b[0] <= b[2] && b[1] <= b[3],
        "{b:?}"
    );
    let msg = match medvlm_tasks::detection_pipeline::predict_files(
        &out,
        None,
        &name,
        false,
        &[dir.path().join("missing.png")],
        0.3,
        2,
        &pred_dir,
        &Device::Cpu,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a missing image was accepted"),
    };
    assert!(msg.contains("missing.png"), "{msg}");
}
