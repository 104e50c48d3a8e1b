//! The few-shot sampler: balanced, realistic and multi-label draws.

use medvlm_adapt::fewshot::{
    realistic_quotas, sample_support, sample_support_multilabel, FewShotError, FewShotProtocol,
    HyperparameterPolicy, SamplingMode, TaskKind, STANDARD_SHOTS,
};

fn names(n: usize) -> Vec<String> {
    (0..n).map(|c| format!("c{c}")).collect()
}

/// 3 classes with 30, 20 and 5 images, interleaved.
fn pool() -> Vec<usize> {
    let mut v = Vec::new();
    for i in 0..30 {
        v.push(0);
        if i < 20 {
            v.push(1);
        }
        if i < 5 {
            v.push(2);
        }
    }
    v
}

fn counts(labels: &[usize], idx: &[usize], c: usize) -> Vec<usize> {
    let mut n = vec![0; c];
    for &i in idx {
        n[labels[i]] += 1;
    }
    n
}

#[test]
fn balanced_draws_exactly_k_per_class_deterministically() {
    let labels = pool();
    for k in [1, 2, 4] {
        let a = sample_support(&labels, &names(3), k, 1, &SamplingMode::Balanced).unwrap();
        assert_eq!(counts(&labels, &a, 3), vec![k; 3]);
        let mut dedup = a.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), a.len(), "indices must be distinct");
        assert_eq!(
            a,
            sample_support(&labels, &names(3), k, 1, &SamplingMode::Balanced).unwrap()
        );
    }
    let s1 = sample_support(&labels, &names(3), 4, 1, &SamplingMode::Balanced).unwrap();
    let s2 = sample_support(&labels, &names(3), 4, 2, &SamplingMode::Balanced).unwrap();
    assert_ne!(s1, s2, "different seeds should give different draws");
    assert_eq!(STANDARD_SHOTS, [1, 2, 4, 8, 16]);
}

#[test]
fn too_few_images_names_the_class_and_the_count() {
    let labels = pool();
    let err = sample_support(&labels, &names(3), 8, 1, &SamplingMode::Balanced).unwrap_err();
    match &err {
        FewShotError::NotEnoughImages {
            class,
            name,
            available,
            requested,
        } => {
            assert_eq!(
                (*class, name.as_str(), *available, *requested),
                (2, "c2", 5, 8)
            );
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("'c2'") && msg.contains("only 5") && msg.contains("at most 5"),
        "{msg}"
    );
    let err = sample_support(&[0, 3], &names(2), 1, 1, &SamplingMode::Balanced).unwrap_err();
    assert!(matches!(
        err,
        FewShotError::LabelOutOfRange {
            index: 1,
            label: 3,
            num_classes: 2
        }
    ));
}

#[test]
fn realistic_mode_follows_the_dataset_prior() {
    // Counts 30/20/5 (total 55), budget K x C = 4 x 3 = 12:
    // ideal 6.55 / 4.36 / 1.09 -> floors 6 / 4 / 1 = 11, the leftover goes to
    // the largest remainder (class 0, 0.55) -> 7 / 4 / 1.
    assert_eq!(
        realistic_quotas(&[30, 20, 5], &names(3), 12, 1).unwrap(),
        vec![7, 4, 1]
    );
    // A floor of 2 per class takes one back from the largest class.
    assert_eq!(
        realistic_quotas(&[30, 20, 5], &names(3), 12, 2).unwrap(),
        vec![6, 4, 2]
    );
    // A class with fewer images than its share is capped and the rest spread.
    assert_eq!(
        realistic_quotas(&[100, 3], &names(2), 20, 1)
            .unwrap()
            .iter()
            .sum::<usize>(),
        20
    );

    let labels = pool();
    let mode = SamplingMode::Realistic { min_per_class: 1 };
    let idx = sample_support(&labels, &names(3), 4, 3, &mode).unwrap();
    assert_eq!(counts(&labels, &idx, 3), vec![7, 4, 1]);
    // Budget above the pool size.
    let err = sample_support(&labels, &names(3), 20, 3, &mode)
        .unwrap_err()
        .to_string();
    assert!(err.contains("budget"), "{err}");
}

#[test]
fn multilabel_sampling_reaches_k_positives_per_label() {
    // 40 images, 3 labels: label j present when (i >> j) & 1 on i mod 8.
    let rows: Vec<Vec<bool>> = (0..40)
        .map(|i| (0..3).map(|j| ((i % 8) >> j) & 1 == 1).collect())
        .collect();
    for k in [1, 2, 4] {
        let idx = sample_support_multilabel(&rows, &names(3), k, 5).unwrap();
        for j in [0usize, 1, 2] {
            let pos = idx.iter().filter(|&&i| rows[i][j]).count();
            assert!(pos >= k, "label {j}: {pos} < {k}");
        }
        // Greedy: no more images than K per label would need.
        assert!(idx.len() <= 3 * k);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
    }
    let rare: Vec<Vec<bool>> = (0..10).map(|i| vec![i == 0, true]).collect();
    let err = sample_support_multilabel(&rare, &names(2), 2, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'c0'") && err.contains("only 1"), "{err}");
}

#[test]
fn protocol_serialises_and_describes_itself() {
    let p = FewShotProtocol::realistic(
        8,
        4,
        TaskKind::MultiLabel,
        HyperparameterPolicy::SupportCv { folds: 4 },
    );
    let json = serde_json::to_string(&p).unwrap();
    let back: FewShotProtocol = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
    assert!(
        json.contains("\"kind\":\"realistic\"") && json.contains("\"task\":\"multi-label\""),
        "{json}"
    );
    let d = p.describe();
    assert!(
        d.contains("8-shot")
            && d.contains("realistic")
            && d.contains("4-fold")
            && d.contains("no validation set"),
        "{d}"
    );
    let b = FewShotProtocol::balanced(16, 0, TaskKind::MultiClass);
    let err = b.sample(&pool(), &names(3)).unwrap_err().to_string();
    assert!(err.contains("'c2'"), "{err}");
}
