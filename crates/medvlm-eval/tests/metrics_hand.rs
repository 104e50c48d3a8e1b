//! Metric values checked against small examples computed by hand (the derivation is in the
//! comment above each assertion).

use medvlm_eval::auroc::{auroc_binary, auroc_multilabel, auroc_one_vs_rest};
use medvlm_eval::calibration::{reliability_diagram, reliability_from_confidences};
use medvlm_eval::classification::{accuracy, argmax_rows, ClassificationReport};
use medvlm_eval::fewshot_table::{FewShotResult, FewShotTable, MeanStd};
use medvlm_eval::multilabel::multilabel_f1;
use medvlm_eval::retrieval::{retrieval_recall, retrieval_recall_paired};
use medvlm_eval::EvalError;

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} != {b} (tol {tol})");
}

#[test]
fn classification_metrics_by_hand() {
    // truth [0,0,1,1,2], pred [0,1,1,1,0]
    // confusion rows (truth): [1,1,0], [0,2,0], [1,0,0]
    let r = ClassificationReport::new(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 3).unwrap();
    assert_eq!(
        r.confusion.counts,
        vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]
    );
    close(r.accuracy, 0.6, 1e-12);
    // recalls 1/2, 1, 0 -> 0.5
    close(r.balanced_accuracy, 0.5, 1e-12);
    // F1: c0 2/(2+1+1)=0.5, c1 4/(4+1+0)=0.8, c2 0 -> 1.3/3
    close(r.macro_f1, 1.3 / 3.0, 1e-12);
    close(r.per_class[0].precision, 0.5, 1e-12);
    close(r.per_class[1].precision, 2.0 / 3.0, 1e-12);
    assert_eq!(r.per_class[2].support, 1);
    // A 4th class that never occurs nor is predicted is not averaged (scikit-learn).
    let r4 = ClassificationReport::new(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 4).unwrap();
    close(r4.macro_f1, 1.3 / 3.0, 1e-12);
    close(r4.balanced_accuracy, 0.5, 1e-12);
    close(accuracy(&[1, 2], &[1, 1]).unwrap(), 0.5, 1e-12);
}

#[test]
fn classification_errors_are_reported() {
    assert!(matches!(
        ClassificationReport::new(&[0, 1], &[0], 2),
        Err(EvalError::LengthMismatch { .. })
    ));
    assert!(matches!(
        ClassificationReport::new(&[0, 3], &[0, 1], 2),
        Err(EvalError::IndexOutOfRange { index: 3, .. })
    ));
    assert!(matches!(
        ClassificationReport::new(&[], &[], 2),
        Err(EvalError::Empty(_))
    ));
    assert_eq!(
        argmax_rows(&[0.1, 0.7, 0.2, 0.5, 0.5, 0.0], 3).unwrap(),
        vec![1, 0]
    );
}

#[test]
fn auroc_with_a_tie_by_hand() {
    // positives score {0.4, 0.8}, negatives {0.1, 0.4}.
    // pairs: (0.4,0.1)=1, (0.4,0.4)=0.5, (0.8,0.1)=1, (0.8,0.4)=1 -> 3.5/4
    let a = auroc_binary(&[0.1, 0.4, 0.4, 0.8], &[false, true, false, true])
        .unwrap()
        .unwrap();
    close(a, 0.875, 1e-12);
    // Perfectly inverted ranking.
    let a = auroc_binary(&[0.9, 0.8, 0.1], &[false, false, true])
        .unwrap()
        .unwrap();
    close(a, 0.0, 1e-12);
    // All scores tied: 0.5.
    let a = auroc_binary(&[0.3; 4], &[true, false, true, false])
        .unwrap()
        .unwrap();
    close(a, 0.5, 1e-12);
    // Undefined without negatives.
    assert_eq!(auroc_binary(&[0.1, 0.2], &[true, true]).unwrap(), None);
    assert!(auroc_binary(&[f32::NAN, 0.2], &[true, false]).is_err());
}

#[test]
fn one_vs_rest_and_multilabel_auroc() {
    // 4 samples x 3 classes; class 2 never occurs -> undefined and listed.
    let scores = [
        0.7, 0.2, 0.1, //
        0.4, 0.5, 0.1, //
        0.3, 0.3, 0.4, //
        0.1, 0.8, 0.1,
    ];
    let y = [0, 0, 1, 1];
    let r = auroc_one_vs_rest(&scores, &y, 3).unwrap();
    // class 0: pos {0.7,0.4} neg {0.3,0.1}: all 4 pairs won -> 1
    close(r.per_class[0].unwrap(), 1.0, 1e-12);
    // class 1: pos {0.3,0.8} neg {0.2,0.5}: (0.3>0.2)=1,(0.3<0.5)=0,(0.8>0.2)=1,(0.8>0.5)=1 -> 3/4
    close(r.per_class[1].unwrap(), 0.75, 1e-12);
    assert_eq!(r.per_class[2], None);
    assert_eq!(r.undefined_classes, vec![2]);
    close(r.macro_auroc.unwrap(), 0.875, 1e-12);

    let ml = auroc_multilabel(
        &[0.9, 0.2, 0.6, 0.7, 0.1, 0.4],
        &[true, false, false, true, true, true],
        2,
    )
    .unwrap();
    // label 0: pos {0.9, 0.1} neg {0.6}: 1 + 0 -> 0.5
    close(ml.per_class[0].unwrap(), 0.5, 1e-12);
    // label 1: pos {0.7, 0.4} neg {0.2}: 1 + 1 -> 1
    close(ml.per_class[1].unwrap(), 1.0, 1e-12);
}

#[test]
fn multilabel_f1_by_hand() {
    // preds at 0.5: [T,F], [T,T], [F,F]; targets [T,F], [F,T], [T,T]
    // label0: tp1 fp1 fn1 -> 0.5 ; label1: tp1 fp0 fn1 -> 2/3
    let r = multilabel_f1(
        &[0.9, 0.2, 0.6, 0.7, 0.1, 0.4],
        &[true, false, false, true, true, true],
        2,
        0.5,
    )
    .unwrap();
    close(r.per_label_f1[0], 0.5, 1e-12);
    close(r.per_label_f1[1], 2.0 / 3.0, 1e-12);
    close(r.macro_f1, (0.5 + 2.0 / 3.0) / 2.0, 1e-12);
    // micro: tp2 fp1 fn2 -> 4/7
    close(r.micro_f1, 4.0 / 7.0, 1e-12);
    close(r.exact_match, 1.0 / 3.0, 1e-12);
}

#[test]
fn ece_two_bins_by_hand() {
    // bin (0,0.5]: conf {0.2, 0.4}, correct {F, T}: mean conf 0.3, acc 0.5, gap 0.2
    // bin (0.5,1]: conf {0.6, 0.9}, correct {T, F}: mean conf 0.75, acc 0.5, gap 0.25
    // ECE = 0.5*0.2 + 0.5*0.25 = 0.225, MCE = 0.25
    let d = reliability_from_confidences(&[0.2, 0.4, 0.6, 0.9], &[false, true, true, false], 2)
        .unwrap();
    close(d.ece, 0.225, 1e-6);
    close(d.mce, 0.25, 1e-6);
    assert_eq!(d.bins[0].count, 2);
    close(d.bins[1].mean_confidence, 0.75, 1e-6);
    // 0.5 belongs to the first bin (right-closed bins), 0 too.
    let d = reliability_from_confidences(&[0.5, 0.0, 1.0], &[true, true, true], 2).unwrap();
    assert_eq!(d.bins[0].count, 2);
    assert_eq!(d.bins[1].count, 1);
    // From a probability matrix: rows [0.8,0.2] (pred 0, truth 0), [0.3,0.7] (pred 1, truth 0)
    // one bin: conf mean 0.75, acc 0.5 -> 0.25
    let d = reliability_diagram(&[0.8, 0.2, 0.3, 0.7], &[0, 0], 2, 1).unwrap();
    close(d.ece, 0.25, 1e-6);
    assert!(reliability_from_confidences(&[1.5], &[true], 2).is_err());
    assert!(reliability_from_confidences(&[0.5], &[true], 0).is_err());
}

#[test]
fn retrieval_recall_by_hand() {
    // 3 images x 4 texts; image 0 has two correct texts (0 and 1), image 1 -> text 2,
    // image 2 -> text 3.
    let sim = [
        0.1, 0.9, 0.5, 0.0, // image 0: best correct text 1 at rank 1
        0.8, 0.1, 0.7, 0.2, // image 1: text 2 (0.7) behind text 0 (0.8): rank 2
        0.3, 0.2, 0.9, 0.1, // image 2: text 3 (0.1) last: rank 4
    ];
    let pos = [(0, 0), (0, 1), (1, 2), (2, 3)];
    let r = retrieval_recall(&sim, 3, 4, &pos, &[1, 2, 5]).unwrap();
    close(r.image_to_text.at(1).unwrap(), 1.0 / 3.0, 1e-12);
    close(r.image_to_text.at(2).unwrap(), 2.0 / 3.0, 1e-12);
    close(r.image_to_text.at(5).unwrap(), 1.0, 1e-12);
    close(r.image_to_text.mean_rank, (1.0 + 2.0 + 4.0) / 3.0, 1e-12);
    // text->image, columns: t0 [0.1,0.8,0.3] correct img0 -> rank 3; t1 [0.9,0.1,0.2] -> 1;
    // t2 [0.5,0.7,0.9] correct img1 -> rank 2; t3 [0.0,0.2,0.1] correct img2 -> rank 2
    close(r.text_to_image.at(1).unwrap(), 0.25, 1e-12);
    close(r.text_to_image.at(2).unwrap(), 0.75, 1e-12);
    assert_eq!(r.text_to_image.queries, 4);

    // Query without a correct item is skipped and counted.
    let r = retrieval_recall(&sim, 3, 4, &[(0, 1)], &[1]).unwrap();
    assert_eq!(r.image_to_text.skipped_queries, 2);
    assert_eq!(r.text_to_image.skipped_queries, 3);
    // Ties count against the query: constant matrix is not a perfect score.
    let r = retrieval_recall_paired(&[1.0; 4], 2, &[1]).unwrap();
    close(r.image_to_text.at(1).unwrap(), 0.0, 1e-12);
    assert!(retrieval_recall(&sim, 3, 4, &[(3, 0)], &[1]).is_err());
}

#[test]
fn fewshot_table_mean_std() {
    let m = MeanStd::from_values(&[0.8, 0.9]).unwrap();
    close(m.mean, 0.85, 1e-12);
    // sample std: sqrt((0.05^2 + 0.05^2) / 1)
    close(m.std, (0.005f64).sqrt(), 1e-12);
    let table = FewShotTable::new(
        "accuracy",
        &[
            FewShotResult {
                method: "zero-shot".into(),
                shots: 0,
                values: vec![0.5],
            },
            FewShotResult {
                method: "linear-probe".into(),
                shots: 1,
                values: vec![0.8, 0.9],
            },
            FewShotResult {
                method: "linear-probe".into(),
                shots: 4,
                values: vec![0.9, 0.9],
            },
        ],
    );
    assert_eq!(table.shots, vec![0, 1, 4]);
    let md = table.to_markdown(100.0, 1);
    assert!(
        md.contains("| linear-probe | – | 85.0 ± 7.1 | 90.0 ± 0.0 |"),
        "{md}"
    );
    assert!(md.contains("| zero-shot | 50.0 ± 0.0 | – | – |"), "{md}");
}

#[test]
fn average_precision_matches_scikit_learn_example() {
    // scikit-learn's documented example of average_precision_score: 0.8333...
    let ap = medvlm_eval::multilabel::average_precision(
        &[0.1, 0.4, 0.35, 0.8],
        &[false, false, true, true],
    )
    .unwrap();
    assert!((ap - 0.833_333_333).abs() < 1e-6, "{ap}");
    // Perfect ranking and no positives.
    assert_eq!(
        medvlm_eval::multilabel::average_precision(&[0.9, 0.1], &[true, false]),
        Some(1.0)
    );
    assert_eq!(
        medvlm_eval::multilabel::average_precision(&[0.9, 0.1], &[false, false]),
        None
    );
    // All scores tied: one threshold, AP = prevalence.
    let tied = medvlm_eval::multilabel::average_precision(&[0.5; 4], &[true, false, false, false])
        .unwrap();
    assert!((tied - 0.25).abs() < 1e-12, "{tied}");
}

#[test]
fn random_recall_and_grouped_zero_shot_by_hand() {
    use medvlm_eval::classification::pooled_and_within_groups;
    use medvlm_eval::retrieval::random_recall_at_k;
    // 4 distinct texts: a random top-1 finds the one correct item 1 time in 4.
    assert!((random_recall_at_k(&["a", "b", "c", "d"], 1) - 0.25).abs() < 1e-12);
    // "a" twice among 4: P(miss at K=1) = 2/4 for the two "a" queries, 3/4 for the others.
    let r = random_recall_at_k(&["a", "a", "b", "c"], 1);
    assert!((r - (0.5 + 0.5 + 0.25 + 0.25) / 4.0).abs() < 1e-12);
    assert_eq!(random_recall_at_k(&["a", "b"], 5), 1.0);

    // Classes 0, 1 in group "x", class 2 in group "y". Sample 0 (x, truth 0) scores class 2
    // highest: wrong pooled, right within x. Sample 1 (x, truth 1) right in both. Sample 2
    // (y, truth 2) right.
    let scores = [0.3, 0.1, 0.9, 0.1, 0.8, 0.2, 0.0, 0.1, 0.7];
    let g =
        pooled_and_within_groups(&scores, &[0, 1, 2], &["x", "x", "y"], &["x", "x", "y"]).unwrap();
    assert_eq!(g["x"].pooled.accuracy, 0.5);
    assert_eq!(g["x"].within.accuracy, 1.0);
    assert_eq!(g["x"].classes, vec![0, 1]);
    assert_eq!(g["y"].within.n, 1);
    // A sample whose truth is not a class of its group is an error.
    assert!(pooled_and_within_groups(&scores[..3], &[2], &["x", "x", "y"], &["x"]).is_err());
}
