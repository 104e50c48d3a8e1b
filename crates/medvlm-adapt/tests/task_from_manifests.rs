//! A classification task from manifests, as a library call: classes, rows, filters, notes.

use medvlm_adapt::fewshot::TaskKind;
use medvlm_adapt::task::{RowTarget, Task, TaskError, TaskSpec};

fn spec(label_field: &str, filters: &[&str]) -> TaskSpec {
    TaskSpec {
        label_field: label_field.into(),
        filters: filters.iter().map(|s| s.to_string()).collect(),
        classes: None,
        split: "train".into(),
    }
}

#[test]
fn multi_class_and_multi_label_tasks_read_from_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.jsonl");
    std::fs::write(
        &m,
        r#"{"image": "a.png", "split": "train", "label": "mass", "site": "x", "labels": ["mass"]}
{"image": "b.png", "split": "train", "label": "normal", "site": "x", "labels": ["normal"]}
{"image": "c.png", "split": "test", "label": "mass", "site": "y", "labels": ["mass", "effusion"]}
{"image": "d.png", "split": "train", "site": "x", "labels": []}
{"image": "e.png", "split": "test", "label": "nodule", "site": "x", "labels": ["effusion"]}
"#,
    )
    .unwrap();
    let t = Task::from_manifests(std::slice::from_ref(&m), &spec("label", &[])).unwrap();
    assert_eq!(t.kind, TaskKind::MultiClass);
    // Classes from the train split, sorted; the test-only 'nodule' is outside them.
    assert_eq!(t.class_names, ["mass", "normal"]);
    assert_eq!(t.rows.len(), 3);
    assert_eq!(t.rows[2].target, RowTarget::Class(0));
    assert_eq!(t.rows[2].path, dir.path().join("c.png"));
    assert_eq!(t.split_rows("test"), [2]);
    assert_eq!(t.manifest_sha256.len(), 64);
    assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
    assert!(t.notes[0].contains("1 record(s) without a 'label' value and 1 with a label outside"));

    // Filters select records; 'labels' makes a multi-label task where 'normal' is no class.
    let t = Task::from_manifests(std::slice::from_ref(&m), &spec("labels", &["site=x"])).unwrap();
    assert_eq!(t.kind, TaskKind::MultiLabel);
    assert_eq!(t.class_names, ["mass"]);
    assert_eq!(t.multi_hot(&[0, 1]).unwrap(), [vec![true], vec![false]]);
    assert_eq!(t.label_text(1), "normal");

    // Refusals name the reason.
    let err =
        Task::from_manifests(std::slice::from_ref(&m), &spec("label", &["site=z"])).unwrap_err();
    assert!(matches!(err, TaskError::Invalid(_)));
    assert!(
        err.to_string().contains("no records matching --where"),
        "{err}"
    );
    for field in ["label", "labels"] {
        let twice = TaskSpec {
            classes: Some("mass; normal;mass".into()),
            ..spec(field, &[])
        };
        let err = Task::from_manifests(std::slice::from_ref(&m), &twice).unwrap_err();
        assert!(err.to_string().contains("names a class twice"), "{err}");
    }
    let err =
        Task::from_manifests(&[dir.path().join("none.jsonl")], &spec("label", &[])).unwrap_err();
    assert!(matches!(err, TaskError::Io(_)), "{err}");
    assert!(err.to_string().contains("none.jsonl"), "{err}");
}
