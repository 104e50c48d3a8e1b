//! `medvlm_train::quickstart::run` as a library call: refusals before any data is written,
//! and a tiny run whose returned outcome, progress reports and written files agree.

use medvlm_train::quickstart::{run, QuickstartOptions, QuickstartPlan, QuickstartProgress};
use medvlm_train::trainer::StepRecord;

#[derive(Default)]
struct Recorder {
    stages: Vec<String>,
    total: Option<u64>,
    updates: Vec<u64>,
    validations: usize,
    ended: bool,
}

impl QuickstartProgress for Recorder {
    fn stage(&mut self, line: &str) {
        self.stages.push(line.to_string());
    }
    fn training_start(&mut self, _start: u64, total: u64) {
        self.total = Some(total);
    }
    fn training_update(&mut self, r: &StepRecord) {
        self.updates.push(r.step);
    }
    fn validation(&mut self, _epoch: u64, _metrics: &serde_json::Value) {
        self.validations += 1;
    }
    fn training_end(&mut self) {
        self.ended = true;
    }
}

#[test]
fn unusable_settings_are_refused_before_the_benchmark_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    for opts in [
        QuickstartOptions {
            image_tower: Some("convnext".into()),
            tiny: true,
            ..Default::default()
        },
        QuickstartOptions {
            text_section: Some("findings".into()),
            tiny: true,
            ..Default::default()
        },
    ] {
        let err = QuickstartPlan::new(&opts).unwrap_err().to_string();
        assert!(err.contains("expected"), "{err}");
    }
    let out = tmp.path().join("bad");
    let opts = QuickstartOptions {
        lr: Some(0.0),
        tiny: true,
        ..Default::default()
    };
    let err = run(&opts, &out, &mut Recorder::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("optim.lr"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_tiny_run_reports_what_it_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let opts = QuickstartOptions {
        n: 160,
        epochs: 2,
        tiny: true,
        ..Default::default()
    };
    let mut rec = Recorder::default();
    let outcome = run(&opts, &out, &mut rec).unwrap();

    // Stages in order, every update seen, validation every epoch (short runs), bar closed.
    let starts: Vec<&str> = rec.stages.iter().filter_map(|s| s.get(..5)).collect();
    let pos = |p: &str| starts.iter().position(|s| *s == p).unwrap();
    assert!(
        pos("[1/4]") < pos("[2/4]") && pos("[2/4]") < pos("[3/4]") && pos("[3/4]") < pos("[4/4]")
    );
    let updates = outcome.metrics["run"]["updates"].as_u64().unwrap();
    assert!(updates > 0);
    assert_eq!(rec.updates.len() as u64, updates);
    assert_eq!(rec.total, Some(updates));
    assert_eq!(rec.validations, 2);
    assert!(rec.ended);

    // The returned metrics are the file's, and the verdicts follow them.
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(on_disk, outcome.metrics);
    assert_eq!(outcome.verdicts.len(), 4);
    for v in &outcome.verdicts {
        let z = &on_disk["test"]["zero_shot"][v.modality];
        assert_eq!(z["pooled_balanced_accuracy"].as_f64(), Some(v.pooled_test));
        assert_eq!(
            z["within_modality_balanced_accuracy"].as_f64(),
            Some(v.within_test)
        );
        assert_eq!(z["within_modality_target"].as_f64(), Some(v.within_target));
        assert_eq!(
            v.met,
            v.pooled_test >= 3.0 / 18.0 && v.within_test >= v.within_target
        );
        let h = &on_disk["test_heldout_site"]["zero_shot"][v.modality];
        assert_eq!(h["pooled_balanced_accuracy"].as_f64(), v.pooled_heldout);
    }
    let summary = outcome.summary();
    for v in &outcome.verdicts {
        assert!(summary.contains(v.modality), "{summary}");
    }
    assert_eq!(
        summary.contains("every modality learned"),
        outcome.all_met(),
        "{summary}"
    );
    for f in [
        "report.html",
        "quickstart.toml",
        "train_log.jsonl",
        "benchmark/test.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The training checkpoints are removed once the model is saved.
    assert!(!out.join("checkpoints").exists());
}
