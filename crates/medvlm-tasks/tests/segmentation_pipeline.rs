//! The segmentation pipeline on files: manifest errors name the file, the saved segmenter
//! predicts exactly what the trained one did, NIfTI masks keep the input's affine and
//! shape, and a short training on phantoms beats the similarity baseline. All on the tiny
//! CLIP parity fixture (random weights, 32 px, a 4x4 patch grid) and phantoms at 32 px.

use std::path::Path;

use candle_core::Device;

use medvlm_io::Plane;
use medvlm_phantoms::{DatasetConfig, Modality, StudyOptions};
use medvlm_tasks::segmentation_pipeline::{
    load_images, read_plane, train_segmenter, SegAdapter, SegLora, SegPipelineError, SegTask,
    Segmenter, TrainOptions,
};

mod common;
use common::{fixture, max_abs_diff, model};

/// Phantoms at 32 px (one finding type per study) in `dir`.
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
        width: Some(32),
        lr: None,
        tower_lr: None,
        seed: 3,
        split: None,
        layers: Vec::new(),
        pixel_width: None,
        grey_standardise: None,
        lora: None,
        adapter: None,
    }
}

/// Every image of `task`, read as the segmenter reads files.
fn planes_of(task: &SegTask) -> Vec<Plane> {
    task.items
        .iter()
        .map(|i| read_plane(&i.image).unwrap())
        .collect()
}

fn grey_png(path: &Path, side: usize) {
    let plane = Plane::new(side, side, 1, vec![0.5; side * side]).unwrap();
    medvlm_io::raster::write_png(path, &plane).unwrap();
}

#[test]
fn manifest_errors_name_the_mask_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    grey_png(&d.join("a.png"), 32);
    grey_png(&d.join("small_mask.png"), 16);
    // A mask file that does not exist.
    std::fs::write(
        d.join("missing.jsonl"),
        r#"{"image": "a.png", "masks": [{"label": "nodule", "path": "gone_mask.png"}]}"#,
    )
    .unwrap();
    let err = SegTask::from_manifest(&d.join("missing.jsonl"), None).unwrap_err();
    assert!(matches!(err, SegPipelineError::Mask { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("gone_mask.png") && msg.contains("no such file"),
        "{msg}"
    );

    // A mask of another size than its image.
    std::fs::write(
        d.join("size.jsonl"),
        r#"{"image": "a.png", "masks": [{"label": "nodule", "path": "small_mask.png"}]}"#,
    )
    .unwrap();
    let task = SegTask::from_manifest(&d.join("size.jsonl"), None).unwrap();
    let err = match load_images(&model(), &task, &Device::Cpu) {
        Err(e) => e,
        Ok(_) => panic!("a 16x16 mask of a 32x32 image was accepted"),
    };
    let msg = err.to_string();
    assert!(matches!(err, SegPipelineError::MaskSize { .. }), "{msg}");
    assert!(
        msg.contains("small_mask.png") && msg.contains("16x16") && msg.contains("32x32"),
        "{msg}"
    );

    // A mask file that is not an image.
    std::fs::write(d.join("junk_mask.png"), b"not a png").unwrap();
    std::fs::write(
        d.join("junk.jsonl"),
        r#"{"image": "a.png", "masks": [{"label": "nodule", "path": "junk_mask.png"}]}"#,
    )
    .unwrap();
    let task = SegTask::from_manifest(&d.join("junk.jsonl"), None).unwrap();
    let msg = match load_images(&model(), &task, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an undecodable mask was accepted"),
    };
    assert!(msg.contains("junk_mask.png"), "{msg}");
}

#[test]
fn saved_segmenter_predicts_the_same_masks_and_nifti_keeps_the_affine() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(&data, 24, 5, vec![Modality::Dermoscopy, Modality::BrainMri]);
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    // 80 steps: enough for the head to mark some pixels (the comparison below needs them).
    let trained = train_segmenter(model(), &task, &options(80), &dev).unwrap();
    let seg = trained.segmenter;
    let art = dir.path().join("seg");
    seg.save(&art).unwrap();
    assert!(art.join("head.safetensors").is_file() && art.join("segmenter.json").is_file());
    let (loaded, warning) = Segmenter::load(&art, None, &dev).unwrap();
    assert_eq!(warning, None, "same model, same fingerprint");
    assert_eq!(loaded.card, seg.card);

    // Identical masks on the task's images, for every class.
    let planes = planes_of(&task);
    let mut any = 0usize;
    for c in &seg.card.classes {
        let (t0, _) = seg.prompt_embedding(&c.name, &dev).unwrap();
        let (t1, matched) = loaded.prompt_embedding(&c.name, &dev).unwrap();
        assert_eq!(matched.as_deref(), Some(c.name.as_str()));
        let a = seg.segment_planes(&planes, &t0, &dev).unwrap();
        let b = loaded.segment_planes(&planes, &t1, &dev).unwrap();
        assert_eq!(a, b, "class {}", c.name);
        any += a.iter().flatten().map(|&v| v as usize).sum::<usize>();
    }
    assert!(any > 0, "the comparison would be vacuous on empty masks");
    // And the same evaluation.
    assert_eq!(
        seg.evaluate(&task, &dev).unwrap(),
        loaded.evaluate(&task, &dev).unwrap()
    );

    // A NIfTI volume of 3 slices of 32x32 with an oblique affine: the mask keeps both.
    let dims = [32usize, 32, 3];
    let plane = read_plane(&task.items[0].image).unwrap();
    let grey: Vec<f32> = if plane.channels == 3 {
        plane
            .data
            .chunks(3)
            .map(|p| (p[0] + p[1] + p[2]) / 3.0)
            .collect()
    } else {
        plane.data.clone()
    };
    let mut vol = vec![0f32; 32 * 32 * 3];
    for x in 0..32 {
        for y in 0..32 {
            for z in 0..3 {
                vol[(x * 32 + y) * 3 + z] = grey[x * 32 + y] * (1.0 + z as f32) * 100.0;
            }
        }
    }
    let affine = [
        [0.0, -0.8, 0.1, 12.5],
        [0.9, 0.0, 0.0, -30.0],
        [0.0, 0.05, 2.5, 7.25],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let nii = dir.path().join("vol.nii.gz");
    medvlm_io::volume::write_nifti1(&nii, &vol, &dims, &affine).unwrap();
    let out = dir.path().join("pred");
    let (text, _) = loaded
        .prompt_embedding(&seg.card.classes[0].name, &dev)
        .unwrap();
    let written = loaded.predict_file(&nii, &text, 2, &out, &dev).unwrap();
    assert_eq!(written.slices, 3);
    let mask_path = written.mask_nifti.expect("a NIfTI mask for a NIfTI input");
    let back = medvlm_io::volume::read_nifti(&mask_path).unwrap();
    assert_eq!(back.shape, dims.to_vec());
    let got = back.affine.unwrap();
    for r in 0..4 {
        for c in 0..4 {
            assert!((got[r][c] - affine[r][c]).abs() < 1e-5, "affine {got:?}");
        }
    }
    assert!(back.data.iter().all(|&v| v == 0.0 || v == 1.0));
    // Slice by slice: slice k of the volume is the 2-D prediction of that slice.
    let src = medvlm_io::load_any(&nii).unwrap();
    for k in 0..3 {
        let sel = medvlm_io::PlaneSelect {
            axis: Some(2),
            slice: Some(k),
            ..Default::default()
        };
        let p =
            medvlm_io::preprocess::windowed_plane(&src, &sel, &medvlm_io::Window::Auto).unwrap();
        let m = loaded.segment_planes(&[p], &text, &dev).unwrap().remove(0);
        for x in 0..32 {
            for y in 0..32 {
                assert_eq!(back.data[(x * 32 + y) * 3 + k], f32::from(m[x * 32 + y]));
            }
        }
    }
    assert!(written.mask_png.is_file() && written.overlay_png.is_file());
}

#[test]
fn short_training_beats_the_similarity_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(
        &data,
        48,
        11,
        vec![Modality::Dermoscopy, Modality::BrainMri],
    );
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let trained = train_segmenter(model(), &task, &options(200), &dev).unwrap();
    let first: f32 = trained.losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = trained.losses[190..].iter().sum::<f32>() / 10.0;
    assert!(last < first, "the loss went from {first} to {last}");
    let eval = trained.segmenter.evaluate(&task, &dev).unwrap();
    println!("{}", eval.render_table());
    let head = eval.head.findings.mean_dice.unwrap();
    let base = eval
        .baseline
        .as_ref()
        .expect("CLIP has projected patch tokens")
        .findings
        .mean_dice
        .unwrap();
    assert!(
        head > base + 0.1,
        "head Dice {head} vs similarity baseline {base}\n{}",
        eval.render_table()
    );
    assert!(eval.n_present > 0 && eval.n_absent > 0);
    assert!(eval.skipped_findings.is_empty());
}

/// The fixture CLIP's vision tower has 2 layers of width 32. A head on layer 2 only reads the
/// final patch tokens (CLIP returns them before `post_layernorm`, as the layers are), so it
/// trains exactly as the default head; a head on layers 1 and 2 has its own reductions,
/// trains, and its card and masks survive a save and a load.
#[test]
fn multi_layer_head_trains_and_round_trips_its_card() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(&data, 24, 5, vec![Modality::Dermoscopy, Modality::BrainMri]);
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let steps = 40;

    let default = train_segmenter(model(), &task, &options(steps), &dev).unwrap();
    assert!(default.segmenter.card.head.layers.is_empty());
    let last = train_segmenter(
        model(),
        &task,
        &TrainOptions {
            layers: vec![2],
            ..options(steps)
        },
        &dev,
    )
    .unwrap();
    assert_eq!(last.segmenter.card.head.layers, vec![2]);
    assert_eq!(last.losses, default.losses, "layer 2 is the final layer");

    let multi = train_segmenter(
        model(),
        &task,
        &TrainOptions {
            layers: vec![1, 2],
            ..options(steps)
        },
        &dev,
    )
    .unwrap();
    let card = &multi.segmenter.card;
    assert_eq!(card.head.layers, vec![1, 2]);
    assert_eq!(card.head.feature_dim, 32, "width of one layer's tokens");
    assert_ne!(multi.losses, default.losses, "layer 1 reaches the head");
    let first: f32 = multi.losses[..5].iter().sum::<f32>() / 5.0;
    let end: f32 = multi.losses[steps - 5..].iter().sum::<f32>() / 5.0;
    assert!(end < first, "the loss went from {first} to {end}");
    {
        let vars = multi.segmenter.varmap.data().lock().unwrap();
        assert!(vars.contains_key("skip.1.reduce.weight"));
        assert!(vars.contains_key("skip.1.conv.weight"));
        assert!(!vars.contains_key("skip.2.reduce.weight"));
    }

    // The card records the layers; a default card does not carry the field at all.
    let art = dir.path().join("seg-multi");
    multi.segmenter.save(&art).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("segmenter.json")).unwrap())
            .unwrap();
    assert_eq!(json["head"]["layers"], serde_json::json!([1, 2]));
    let art_default = dir.path().join("seg-default");
    default.segmenter.save(&art_default).unwrap();
    let json_default: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art_default.join("segmenter.json")).unwrap())
            .unwrap();
    assert!(json_default["head"].get("layers").is_none());

    let (loaded, warning) = Segmenter::load(&art, None, &dev).unwrap();
    assert_eq!(warning, None);
    assert_eq!(loaded.card, multi.segmenter.card);
    let planes = planes_of(&task);
    let mut any = 0usize;
    for c in &card.classes {
        let (t, _) = loaded.prompt_embedding(&c.name, &dev).unwrap();
        let a = multi.segmenter.segment_planes(&planes, &t, &dev).unwrap();
        let b = loaded.segment_planes(&planes, &t, &dev).unwrap();
        assert_eq!(a, b, "class {}", c.name);
        any += a.iter().flatten().map(|&v| v as usize).sum::<usize>();
    }
    assert!(any > 0, "the comparison would be vacuous on empty masks");
    assert_eq!(
        multi.segmenter.evaluate(&task, &dev).unwrap(),
        loaded.evaluate(&task, &dev).unwrap()
    );

    // A card whose layers the model does not have fails to load, naming the card.
    let text = std::fs::read_to_string(art.join("segmenter.json")).unwrap();
    let bad = text.replacen(
        "\"layers\": [\n      1,\n      2\n    ]",
        "\"layers\": [1, 5]",
        1,
    );
    assert_ne!(bad, text, "the card's layers were rewritten");
    std::fs::write(art.join("segmenter.json"), bad).unwrap();
    let err = match Segmenter::load(&art, None, &dev) {
        Ok(_) => panic!("a card with layer 5 of a 2-layer tower loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("segmenter.json") && err.contains("layer 5") && err.contains("2 layers"),
        "{err}"
    );
}

#[test]
fn bad_layer_indices_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(&data, 6, 2, vec![Modality::Dermoscopy]);
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    for (layers, want) in [
        (vec![1, 3], "layer 3 does not exist: the tower has 2 layers"),
        (vec![0, 1], "counted from 1"),
        (vec![2, 1], "increasing order"),
        (vec![1, 1], "increasing order"),
    ] {
        let opts = TrainOptions {
            layers: layers.clone(),
            ..options(1)
        };
        let err = match train_segmenter(model(), &task, &opts, &Device::Cpu) {
            Ok(_) => panic!("layers {layers:?} were accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(want), "{layers:?}: {err}");
    }
}

/// A head with a pixel encoder records its width in the card, has the encoder's parameters,
/// and predicts after a save and a load exactly what it did; a card without the field (as
/// written before the encoder existed) loads as a head without one.
#[test]
fn pixel_encoder_head_round_trips_its_card() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(&data, 16, 6, vec![Modality::Dermoscopy]);
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let trained = train_segmenter(
        model(),
        &task,
        &TrainOptions {
            pixel_width: Some(8),
            ..options(20)
        },
        &dev,
    )
    .unwrap();
    let seg = &trained.segmenter;
    assert_eq!(seg.card.head.pixel_width, 8);
    {
        let vars = seg.varmap.data().lock().unwrap();
        // 32 px over a 4x4 grid: three resolutions (32, 16, 8 px), finest first.
        for k in 0..3 {
            assert!(vars.contains_key(&format!("pix.{k}.a.weight")), "level {k}");
        }
        assert!(!vars.contains_key("pix.3.a.weight"));
        assert_eq!(vars["up.0.weight"].dims(), &[32, 32 + 8, 3, 3]);
    }
    let art = dir.path().join("seg-pix");
    seg.save(&art).unwrap();
    let card_path = art.join("segmenter.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    assert_eq!(json["head"]["pixel_width"], serde_json::json!(8));
    let (loaded, _) = Segmenter::load(&art, None, &dev).unwrap();
    assert_eq!(loaded.card, seg.card);
    let planes = planes_of(&task);
    let (t, _) = loaded
        .prompt_embedding(&seg.card.classes[0].name, &dev)
        .unwrap();
    assert_eq!(
        seg.segment_planes(&planes, &t, &dev).unwrap(),
        loaded.segment_planes(&planes, &t, &dev).unwrap()
    );

    // An older card (no `pixel_width`) is a head without the encoder.
    let default = train_segmenter(
        model(),
        &task,
        &TrainOptions {
            pixel_width: Some(0),
            ..options(2)
        },
        &dev,
    )
    .unwrap();
    let art0 = dir.path().join("seg-old");
    default.segmenter.save(&art0).unwrap();
    let text = std::fs::read_to_string(art0.join("segmenter.json")).unwrap();
    assert!(!text.contains("pixel_width"), "{text}");
    let (old, _) = Segmenter::load(&art0, None, &dev).unwrap();
    assert_eq!(old.card.head.pixel_width, 0);
}

/// What every tuned-tower segmenter (LoRA, bottleneck adapters) must do: its adapters train
/// with the head (the patch tokens change), are saved in `folder` and loaded back onto the
/// model (the same masks, the same tokens bit for bit), while the training-free baseline
/// reads the tower without them (the same thresholds and scores as beside a frozen tower);
/// a folder without its adapters is a clear error naming `folder` and `what`. Works in
/// `dir`; returns the task for the caller's own checks.
fn check_tuned_tower(
    dir: &Path,
    tuned: TrainOptions,
    folder: &str,
    what: &str,
    n_adapters: fn(&Segmenter) -> usize,
    want_adapters: usize,
) -> SegTask {
    let data = dir.join("ph");
    phantoms(&data, 16, 4, vec![Modality::Dermoscopy]);
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let trained = train_segmenter(model(), &task, &tuned, &dev).unwrap();
    let seg = &trained.segmenter;
    assert_eq!(n_adapters(seg), want_adapters);
    let frozen_tokens = load_images(&model(), &task, &dev).unwrap();
    let tuned_tokens = load_images(&seg.model, &task, &dev).unwrap();
    let diff = max_abs_diff(&frozen_tokens[0].patches, &tuned_tokens[0].patches);
    assert!(
        diff > 1e-4,
        "the adapted tower gives the frozen tokens ({diff})"
    );

    let frozen = train_segmenter(model(), &task, &options(20), &dev).unwrap();
    assert_eq!(
        frozen.segmenter.card.baseline_thresholds,
        seg.card.baseline_thresholds
    );
    let e_tuned = seg.evaluate(&task, &dev).unwrap();
    let e_frozen = frozen.segmenter.evaluate(&task, &dev).unwrap();
    let (b_tuned, b_frozen) = (e_tuned.baseline.unwrap(), e_frozen.baseline.unwrap());
    assert_eq!(b_tuned.findings.mean_dice, b_frozen.findings.mean_dice);
    assert_eq!(b_tuned.findings.mean_iou, b_frozen.findings.mean_iou);

    let art = dir.join("seg-tuned");
    seg.save(&art).unwrap();
    assert!(art.join(folder).join("adapter_config.json").is_file());
    assert!(art.join(folder).join("adapter_model.safetensors").is_file());
    let (loaded, _) = Segmenter::load(&art, None, &dev).unwrap();
    assert_eq!(loaded.card, seg.card);
    let planes = planes_of(&task);
    let (t, _) = loaded
        .prompt_embedding(&seg.card.classes[0].name, &dev)
        .unwrap();
    assert!(
        seg.segment_planes(&planes, &t, &dev).unwrap()
            == loaded.segment_planes(&planes, &t, &dev).unwrap()
    );
    // The loaded model carries the trained adapters: the same tokens, bit for bit.
    let reloaded_tokens = load_images(&loaded.model, &task, &dev).unwrap();
    for (a, b) in tuned_tokens.iter().zip(&reloaded_tokens) {
        assert_eq!(max_abs_diff(&a.patches, &b.patches), 0.0);
    }

    std::fs::remove_dir_all(art.join(folder)).unwrap();
    let err = Segmenter::load(&art, None, &dev)
        .err()
        .expect("no adapters");
    let msg = err.to_string();
    assert!(msg.contains(folder) && msg.contains(what), "{msg}");
    task
}

/// LoRA in the image tower (`--lora-rank`), the checks of [`check_tuned_tower`]; a rank of 0
/// is a clear error.
#[test]
fn lora_segmenter_trains_the_tower_and_keeps_the_baseline_frozen() {
    let lora_opts = TrainOptions {
        lora: Some(SegLora::new(2)),
        ..options(20)
    };
    // q and v of the fixture's 2 vision blocks; none in the text tower.
    let dir = tempfile::tempdir().unwrap();
    let task = check_tuned_tower(
        dir.path(),
        lora_opts,
        "lora",
        "LoRA",
        |s| medvlm_train::lora::lora_adapters(s.model.model.as_ref()).len(),
        4,
    );
    let dev = Device::Cpu;
    let err = train_segmenter(
        model(),
        &task,
        &TrainOptions {
            lora: Some(SegLora::new(0)),
            ..options(2)
        },
        &dev,
    )
    .err()
    .expect("rank 0");
    assert!(err.to_string().contains("rank"), "{err}");
}

/// Bottleneck adapters in the image tower (`--adapter-bottleneck`), the checks of
/// [`check_tuned_tower`]; LoRA and adapters together are refused.
#[test]
fn adapter_segmenter_trains_the_tower_and_keeps_the_baseline_frozen() {
    let opts = TrainOptions {
        adapter: Some(SegAdapter::new(4)),
        ..options(20)
    };
    // out and fc2 of the fixture's 2 vision blocks.
    let dir = tempfile::tempdir().unwrap();
    let task = check_tuned_tower(
        dir.path(),
        opts,
        "adapter",
        "bottleneck",
        |s| medvlm_train::bottleneck::bottleneck_adapters(s.model.model.as_ref()).len(),
        4,
    );
    let err = train_segmenter(
        model(),
        &task,
        &TrainOptions {
            lora: Some(SegLora::new(2)),
            adapter: Some(SegAdapter::new(4)),
            ..options(2)
        },
        &Device::Cpu,
    )
    .err()
    .expect("both");
    assert!(err.to_string().contains("not both"), "{err}");
}

/// `tower_lr` (`--tower-lr`): the tower's adapters train at their own rate (at a negligible
/// rate they stay where they started, the head still trains; without one, at
/// `ADAPTER_TOWER_LR`) and the card records it; it needs LoRA or adapters, and a positive
/// rate.
#[test]
fn tower_learning_rate_applies_to_the_tower_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ph");
    phantoms(&data, 8, 4, vec![Modality::Dermoscopy]);
    let task = SegTask::from_manifest(&data.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let frozen_tokens = load_images(&model(), &task, &dev).unwrap();
    let with_rate = |tower_lr: Option<f64>| TrainOptions {
        adapter: Some(SegAdapter::new(4)),
        tower_lr,
        ..options(5)
    };
    let still = train_segmenter(model(), &task, &with_rate(Some(1e-30)), &dev).unwrap();
    assert_eq!(still.segmenter.card.head.tower_lr, Some(1e-30));
    let still_tokens = load_images(&still.segmenter.model, &task, &dev).unwrap();
    let diff = max_abs_diff(&frozen_tokens[0].patches, &still_tokens[0].patches);
    // (The wrapped layers sum in another order than the plain ones: rounding, not training.)
    assert!(diff < 1e-5, "adapters moved at a negligible rate ({diff})");
    let moved = train_segmenter(model(), &task, &with_rate(Some(1e-2)), &dev).unwrap();
    let moved_tokens = load_images(&moved.segmenter.model, &task, &dev).unwrap();
    let diff = max_abs_diff(&frozen_tokens[0].patches, &moved_tokens[0].patches);
    assert!(
        diff > 1e-3,
        "adapters did not train at their own rate ({diff})"
    );
    // Without a rate the adapters train at their default, not at the head's.
    let default = train_segmenter(model(), &task, &with_rate(None), &dev).unwrap();
    assert_eq!(
        default.segmenter.card.head.tower_lr,
        Some(medvlm_tasks::segmentation_pipeline::ADAPTER_TOWER_LR)
    );
    // The head trained in both runs (its loss moved).
    for run in [&still, &moved] {
        let l = &run.losses;
        assert!(l.first() != l.last(), "{l:?}");
    }

    for (opts, want) in [
        (
            TrainOptions {
                tower_lr: Some(1e-4),
                ..options(2)
            },
            "needs LoRA or bottleneck adapters",
        ),
        (with_rate(Some(-1.0)), "must be a positive number"),
    ] {
        let err = train_segmenter(model(), &task, &opts, &dev)
            .err()
            .expect("refused");
        assert!(err.to_string().contains(want), "{err}");
    }
}
