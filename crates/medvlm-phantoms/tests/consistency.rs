//! Ground-truth consistency of generated studies: boxes contain their masks,
//! reports mention exactly the findings present (absent ones only negated),
//! answers agree with the labels, and the low-resolution and moved copies are
//! what they claim to be.

use medvlm_phantoms::{generate_study, Laterality, Modality, QaKind, Study, StudyOptions, NORMAL};

/// Words that open a negation scope, as a NegEx-style reader would use them.
const NEGATION_CUES: &[&str] = &["no", "not", "without", "negative"];

fn studies(size: u32, n: u64) -> Vec<Study> {
    let opts = StudyOptions {
        size,
        ..Default::default()
    };
    Modality::ALL
        .iter()
        .flat_map(|&m| (0..n).map(move |i| (m, i)))
        .map(|(m, i)| generate_study(m, 3, i, &opts))
        .collect()
}

#[test]
fn every_box_contains_its_mask_and_is_tight() {
    for s in studies(64, 40) {
        let w = s.width as usize;
        for f in &s.findings {
            let [x0, y0, x1, y1] = f.bbox.map(|v| v as usize);
            assert!(
                x0 < x1 && y0 < y1 && x1 <= w && y1 <= s.height as usize,
                "{}",
                s.id
            );
            let mut touches = [false; 4];
            let mut area = 0;
            for (i, &m) in f.mask.iter().enumerate() {
                assert!(m == 0 || m == 255, "mask values are 0 / 255");
                if m != 0 {
                    let (x, y) = (i % w, i / w);
                    assert!(
                        x >= x0 && x < x1 && y >= y0 && y < y1,
                        "{}: mask pixel outside its box",
                        s.id
                    );
                    touches[0] |= x == x0;
                    touches[1] |= x + 1 == x1;
                    touches[2] |= y == y0;
                    touches[3] |= y + 1 == y1;
                    area += 1;
                }
            }
            assert!(area >= 3, "{}: empty mask for {}", s.id, f.label);
            assert_eq!(
                touches, [true; 4],
                "{}: box of {} is not tight",
                s.id, f.label
            );
        }
    }
}

/// Per sentence: which findings are mentioned, and whether the sentence is
/// negated.
fn mentions(s: &Study) -> Vec<(&'static str, bool)> {
    let mut out = Vec::new();
    for sentence in s.report.to_lowercase().split('.') {
        let words: Vec<&str> = sentence
            .split(|c: char| !c.is_alphanumeric() && c != '-')
            .filter(|w| !w.is_empty())
            .collect();
        let negated = words.iter().any(|w| NEGATION_CUES.contains(w));
        for v in s.modality.vocab() {
            if v.match_terms.iter().any(|t| sentence.contains(t)) {
                out.push((v.label, negated));
            }
        }
    }
    out
}

#[test]
fn reports_mention_exactly_the_findings_present() {
    let mut negations = 0;
    let mut hedges = 0;
    for s in studies(32, 120) {
        let labels = s.labels();
        let m = mentions(&s);
        for v in s.modality.vocab() {
            let present = labels.contains(&v.label);
            let affirmed = m.iter().any(|&(l, neg)| l == v.label && !neg);
            let denied = m.iter().any(|&(l, neg)| l == v.label && neg);
            if present {
                assert!(
                    affirmed,
                    "{}: {} present but not stated: {}",
                    s.id, v.label, s.report
                );
                assert!(
                    !denied,
                    "{}: {} present but negated: {}",
                    s.id, v.label, s.report
                );
            } else {
                assert!(
                    !affirmed,
                    "{}: {} absent but stated: {}",
                    s.id, v.label, s.report
                );
            }
            negations += usize::from(denied);
        }
        hedges += s.findings.iter().filter(|f| f.hedged).count();
        if labels == [NORMAL] {
            assert!(s.findings.is_empty());
        }
    }
    // The reports do use negation and hedging.
    assert!(negations > 100, "{negations} negated mentions");
    assert!(hedges > 20, "{hedges} hedged findings");
}

#[test]
fn reports_vary_in_phrasing() {
    let reports: std::collections::BTreeSet<String> = studies(32, 60)
        .into_iter()
        .filter(|s| s.modality == Modality::ChestXray && s.findings.is_empty())
        .map(|s| s.report)
        .collect();
    // Normal chest reports alone come in many phrasings.
    assert!(
        reports.len() >= 10,
        "only {} distinct normal reports",
        reports.len()
    );
}

#[test]
fn every_answer_agrees_with_the_labels() {
    let mut kinds = std::collections::BTreeSet::new();
    for s in studies(32, 80) {
        let labels = s.labels();
        for q in &s.qa {
            kinds.insert(q.kind);
            if q.closed {
                assert!(q.answer == "yes" || q.answer == "no", "{}: {q:?}", s.id);
            }
            let of = |l: &str| {
                s.findings
                    .iter()
                    .filter(|f| f.label == l)
                    .collect::<Vec<_>>()
            };
            match q.kind {
                QaKind::Modality if q.closed => {
                    let says = q.question.contains(s.modality.display_name());
                    assert_eq!(q.answer == "yes", says, "{}: {q:?}", s.id);
                }
                QaKind::Modality => assert_eq!(q.answer, s.modality.display_name()),
                QaKind::Abnormality if q.closed => {
                    assert_eq!(q.answer == "yes", s.findings.is_empty(), "{}: {q:?}", s.id)
                }
                QaKind::Abnormality => {
                    let expect = if s.findings.is_empty() {
                        "none".to_string()
                    } else {
                        labels
                            .iter()
                            .map(|l| l.replace('_', " "))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    assert_eq!(q.answer, expect, "{}", s.id);
                }
                QaKind::Presence => {
                    let l = q.finding.expect("presence questions name a finding");
                    assert_eq!(q.answer == "yes", labels.contains(&l), "{}: {q:?}", s.id);
                }
                QaKind::Count => {
                    let n = match q.finding {
                        Some(l) => of(l).len(),
                        None => s.findings.len(),
                    };
                    assert_eq!(q.answer, n.to_string(), "{}: {q:?}", s.id);
                }
                QaKind::Location => {
                    let f = of(q.finding.unwrap());
                    assert_eq!(f.len(), 1);
                    assert_eq!(q.answer, f[0].location);
                }
                QaKind::Laterality => {
                    let f = of(q.finding.unwrap());
                    assert_eq!(f.len(), 1);
                    assert_ne!(f[0].laterality, Laterality::None);
                    if q.closed {
                        let asks = if q.question.contains("left") {
                            "left"
                        } else {
                            "right"
                        };
                        assert_eq!(
                            q.answer == "yes",
                            f[0].laterality.name() == asks,
                            "{}: {q:?}",
                            s.id
                        );
                    } else {
                        assert_eq!(q.answer, f[0].laterality.name());
                    }
                }
                QaKind::Size => {
                    let f = of(q.finding.unwrap());
                    assert_eq!(q.answer, f[0].severity.size_class());
                }
            }
        }
    }
    assert_eq!(kinds.len(), 7, "every question kind occurs: {kinds:?}");
}

#[test]
fn location_and_laterality_follow_the_mask() {
    // Radiological convention: the patient's right is on the image left.
    for s in studies(64, 40) {
        for f in &s.findings {
            let w = s.width as f32;
            let (mut sx, mut n) = (0.0, 0.0);
            for (i, &m) in f.mask.iter().enumerate() {
                if m != 0 {
                    sx += (i % s.width as usize) as f32;
                    n += 1.0;
                }
            }
            let cx = sx / n / w;
            match f.laterality {
                Laterality::Right => {
                    assert!(cx < 0.55, "{} {}: right finding at x {cx}", s.id, f.label)
                }
                Laterality::Left => {
                    assert!(cx > 0.45, "{} {}: left finding at x {cx}", s.id, f.label)
                }
                Laterality::None => {}
            }
            if f.laterality != Laterality::None {
                assert!(
                    f.location.starts_with(f.laterality.name()),
                    "{}: {}",
                    s.id,
                    f.location
                );
            }
        }
    }
}

#[test]
fn lowres_is_the_block_average_and_moved_follows_the_field() {
    for s in studies(64, 4) {
        let (w, ch) = (s.width as usize, s.channels as usize);
        let lw = s.lowres_width as usize;
        assert_eq!(lw * 4, w);
        assert_eq!(s.lowres.len(), lw * lw * ch);
        for (oy, ox) in [(0, 0), (3, 7), (lw - 1, lw - 1)] {
            let mut acc = 0u32;
            for dy in 0..4 {
                for dx in 0..4 {
                    acc += s.image[((oy * 4 + dy) * w + ox * 4 + dx) * ch] as u32;
                }
            }
            assert_eq!(
                s.lowres[(oy * lw + ox) * ch] as u32,
                (acc + 8) / 16,
                "{}",
                s.id
            );
        }
        // The field is smooth and not trivial.
        let (dx, dy) = s.deformation.split_at(w * w);
        let max = dx.iter().chain(dy).fold(0.0f32, |a, &b| a.max(b.abs()));
        assert!(
            max > 0.2 && max <= 0.03 * w as f32 + 1e-3,
            "{}: max displacement {max}",
            s.id
        );
        for y in 0..w {
            for x in 1..w {
                assert!(
                    (dx[y * w + x] - dx[y * w + x - 1]).abs() < 0.5,
                    "field is smooth"
                );
            }
        }
        // Integer-shift check at a pixel whose displacement rounds cleanly:
        // moved(x, y) lies between the image values around (x + dx, y + dy).
        for (y, x) in [(20usize, 20usize), (40, 33), (10, 50)] {
            let i = y * w + x;
            let (sx, sy) = (x as f32 + dx[i], y as f32 + dy[i]);
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let around: Vec<u8> = [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)]
                .iter()
                .map(|&(a, b)| s.image[(b.min(w - 1) * w + a.min(w - 1)) * ch])
                .collect();
            let (lo, hi) = (*around.iter().min().unwrap(), *around.iter().max().unwrap());
            let m = s.moved[i * ch];
            assert!(
                m >= lo.saturating_sub(1) && m <= hi.saturating_add(1),
                "{}: moved {m} not in [{lo}, {hi}]",
                s.id
            );
        }
    }
}
