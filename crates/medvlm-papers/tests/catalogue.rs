//! Checks of the embedded catalogue: counts, task mapping, filters, links and the
//! medvlm commands it points to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use medvlm_papers::{
    catalogue, doc_paths, filter, method_names_linked, parse_task, render_table,
    subcommands_linked, Filter, Paper, Relation, Strategy, Task, ANNOTATIONS_TSV,
    IMPLEMENTATIONS_TSV, METHODS_PAPERS_TSV, PAPERS_TSV, TASK_NAMES,
};

/// Every name `medvlm adapt --method NAME` accepts (medvlm_adapt::METHOD_NAMES).
const METHODS: [&str; 21] = [
    "zero-shot",
    "zero-shot-ensemble",
    "zero-shot-descriptions",
    "zero-shot-mixture",
    "zero-shot-pairs",
    "clip-adapter",
    "tip-adapter",
    "tip-adapter-f",
    "taskres",
    "linear-probe",
    "lp++",
    "clap",
    "coop",
    "cocoop",
    "kgcoop",
    "vpt",
    "maple",
    "lora",
    "bitfit",
    "partial-finetune",
    "full-finetune",
];

/// The subcommands a paper may link to: the ones that implement something of the
/// literature today.
const SUBCOMMANDS: [&str; 14] = [
    "adapt",
    "zero-shot",
    "pretrain",
    "finetune",
    "quickstart",
    "segment",
    "anomaly",
    "report",
    "detect",
    "upscale",
    "register",
    "vqa",
    "synthesize",
    "multitask",
];

const CLIP_TITLE: &str = "Learning Transferable Visual Models From Natural Language Supervision";

fn papers() -> Vec<Paper> {
    catalogue().expect("the embedded catalogue parses")
}

fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn titles<'a>(ps: &[&'a Paper]) -> BTreeSet<&'a str> {
    ps.iter().filter_map(|p| p.title.as_deref()).collect()
}

/// Data lines of a TSV file (header excluded).
fn data_lines(text: &str) -> usize {
    text.lines().skip(1).filter(|l| !l.is_empty()).count()
}

#[test]
fn counts_221_source_papers_plus_the_method_papers() {
    let ps = papers();
    let source = ps.iter().filter(|p| p.task != Task::Method).count();
    let methods = ps.iter().filter(|p| p.task == Task::Method).count();
    assert_eq!(source, 221);
    assert_eq!(data_lines(PAPERS_TSV), 221);
    assert_eq!(methods, data_lines(METHODS_PAPERS_TSV));
    assert_eq!(methods, 24);
    assert_eq!(ps.len(), 245);
    // The source's own tally per section.
    let mut per: BTreeMap<Task, usize> = BTreeMap::new();
    for p in &ps {
        *per.entry(p.task).or_default() += 1;
    }
    let expected = [
        (Task::Models, 68),
        (Task::Method, 24),
        (Task::AnomalyDetection, 13),
        (Task::Classification, 32),
        (Task::Synthesis, 11),
        (Task::Retrieval, 7),
        (Task::MultiTask, 16),
        (Task::ReportGeneration, 22),
        (Task::Vqa, 22),
        (Task::Other, 5),
        (Task::Segmentation, 25),
    ];
    assert_eq!(per, expected.into_iter().collect());
}

#[test]
fn every_section_maps_to_a_task_and_back() {
    for line in PAPERS_TSV.lines().skip(1) {
        let section = line.split('\t').next().unwrap();
        let task = Task::from_section(section).unwrap_or_else(|| panic!("section {section:?}"));
        assert_eq!(task.section(), section);
    }
    for p in papers() {
        assert_eq!(Task::from_section(&p.section), Some(p.task));
    }
    assert_eq!(
        Task::from_section("Medical Image Classification"),
        Some(Task::Classification)
    );
    assert_eq!(Task::from_section("classification"), None);
}

#[test]
fn task_short_names_parse() {
    for name in TASK_NAMES {
        parse_task(name).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(parse_task("VQA").unwrap().task, Task::Vqa);
    assert_eq!(
        parse_task("Medical Report Generation").unwrap().task,
        Task::ReportGeneration
    );
    let err = parse_task("tractography").unwrap_err().to_string();
    assert!(
        err.contains("tractography") && err.contains("segmentation"),
        "{err}"
    );
}

#[test]
fn search_clip_in_models_finds_the_clip_paper() {
    let ps = papers();
    let hits = filter(
        &ps,
        &Filter {
            task: Some(parse_task("models").unwrap()),
            search: vec!["CLIP".into()],
            ..Filter::default()
        },
    );
    let t = titles(&hits);
    assert!(t.contains(CLIP_TITLE));
    assert!(t.contains("EVA-CLIP: Improved Training Techniques for CLIP at Scale"));
    // Matching the model name too: BiomedCLIP's title says CLIP, PLIP's model is not CLIP.
    assert!(hits.iter().any(|p| p.model.as_deref() == Some("MedCLIP")));
    assert!(hits.iter().all(|p| p.task == Task::Models));
    assert!(!hits.iter().any(|p| p.model.as_deref() == Some("SAM")));
    // Every word must match.
    let none = filter(
        &ps,
        &Filter {
            search: vec!["clip".into(), "platypus-free-word".into()],
            ..Filter::default()
        },
    );
    assert!(none.is_empty());
}

#[test]
fn search_is_case_insensitive_and_splits_words() {
    let ps = papers();
    let a = filter(
        &ps,
        &Filter {
            search: vec!["segment ANYTHING".into()],
            ..Filter::default()
        },
    );
    assert!(titles(&a).contains("Segment Anything"));
    assert!(a.iter().all(|p| {
        let hay = format!(
            "{} {}",
            p.title.as_deref().unwrap_or(""),
            p.model.as_deref().unwrap_or("")
        )
        .to_lowercase();
        hay.contains("segment") && hay.contains("anything")
    }));
}

#[test]
fn task_filters_return_known_titles() {
    let ps = papers();
    let by = |name: &str| {
        filter(
            &ps,
            &Filter {
                task: Some(parse_task(name).unwrap()),
                ..Filter::default()
            },
        )
    };
    let seg = by("segmentation");
    assert_eq!(seg.len(), 25);
    assert!(titles(&seg)
        .contains("LViT: Language Meets Vision Transformer in Medical Image Segmentation"));
    let cls = by("classification");
    assert_eq!(cls.len(), 32);
    assert!(titles(&cls)
        .contains("Xplainer: From x-ray observations to explainable zero-shot diagnosis"));

    let det = titles(&by("detection"));
    assert_eq!(
        det,
        [
            "Efficient Medical Images Text Detection with Vision-Language Pre-training Approach",
            "Multiple Prompt Fusion for Zero-Shot Lesion Detection Using Vision-Language Models",
            "Zero-Shot Nuclei Detection via Visual-Language Pre-trained Models",
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(
        titles(&by("registration")),
        ["Spatially Covariant Image Registration with Text Prompts"]
            .into_iter()
            .collect()
    );
    assert_eq!(
        titles(&by("super-resolution")),
        ["M2Trans: Multi-Modal Regularized Coarse-to-Fine Transformer for Ultrasound Image Super-Resolution"]
            .into_iter()
            .collect()
    );
    assert_eq!(by("anomaly").len(), 13);
    assert_eq!(by("vqa").len(), 22);
    assert_eq!(by("report").len(), 22);
    assert_eq!(by("retrieval").len(), 7);
    assert_eq!(by("multi-task").len(), 16);
    assert_eq!(by("synthesis").len(), 11);
    assert_eq!(by("models").len(), 68);
    assert!(titles(&by("methods")).contains("Learning to Prompt for Vision-Language Models"));
}

#[test]
fn modality_and_strategy_filters() {
    let ps = papers();
    let path = filter(
        &ps,
        &Filter {
            modality: Some("histology".into()),
            ..Filter::default()
        },
    );
    assert!(
        titles(&path).contains("A visual-language foundation model for computational pathology")
    );
    assert!(path
        .iter()
        .all(|p| p.modality.as_deref() == Some("pathology")));

    let cxr_cls = filter(
        &ps,
        &Filter {
            task: Some(parse_task("classification").unwrap()),
            modality: Some("CXR".into()),
            ..Filter::default()
        },
    );
    assert!(titles(&cxr_cls)
        .contains("Bomd: bag of multi-label descriptors for noisy chest x-ray classification"));
    assert!(cxr_cls
        .iter()
        .all(|p| p.modality.as_deref() == Some("chest X-ray")));

    // "ct" is a whole part, not a substring of other modalities.
    let ct = filter(
        &ps,
        &Filter {
            modality: Some("ct".into()),
            ..Filter::default()
        },
    );
    assert!(titles(&ct).contains("GenerateCT: Text-Conditional Generation of 3D Chest CT Volumes"));
    assert!(ct.iter().all(|p| p.modality.as_deref() == Some("CT")));
    let by_modality = |q: &str| {
        filter(
            &ps,
            &Filter {
                modality: Some(q.into()),
                ..Filter::default()
            },
        )
    };
    assert!(
        by_modality("ray").is_empty(),
        "a fragment is not a modality"
    );
    assert!(!by_modality("fundus").is_empty());
    assert!(by_modality("fundus")
        .iter()
        .all(|p| p.modality.as_deref() == Some("fundus/ophthalmology")));
    assert_eq!(by_modality("retina").len(), by_modality("fundus").len());

    let pl = filter(
        &ps,
        &Filter {
            strategy: Some(Strategy::parse("prompt").unwrap()),
            ..Filter::default()
        },
    );
    assert!(titles(&pl).contains("Learning to Prompt for Vision-Language Models"));
    assert!(titles(&pl)
        .contains("Position-Guided Prompt Learning for Anomaly Detection in Chest X-Rays"));
    assert!(pl
        .iter()
        .all(|p| p.strategy == Some(Strategy::PromptLearning)));
    assert!(Strategy::parse("telepathy").is_err());
    for s in Strategy::ALL {
        assert_eq!(Strategy::parse(s.as_str()).unwrap(), s);
    }
}

#[test]
fn known_annotations() {
    let ps = papers();
    let find = |title: &str| {
        ps.iter()
            .find(|p| p.title.as_deref() == Some(title))
            .unwrap()
    };
    let clip = find(CLIP_TITLE);
    assert_eq!(
        (clip.year, clip.venue.as_deref()),
        (Some(2021), Some("ICML"))
    );
    assert_eq!(clip.strategy, Some(Strategy::Architecture));
    let biomedclip = ps
        .iter()
        .find(|p| p.model.as_deref() == Some("BiomedCLIP"))
        .unwrap();
    assert_eq!(
        (biomedclip.year, biomedclip.venue.as_deref()),
        (Some(2023), Some("arXiv"))
    );
    assert_eq!(biomedclip.strategy, Some(Strategy::DomainPretraining));
    let pubmedclip = ps
        .iter()
        .find(|p| p.model.as_deref() == Some("PubMedCLIP"))
        .unwrap();
    assert_eq!(pubmedclip.venue.as_deref(), Some("Findings of EACL"));
    let coop = find("Learning to Prompt for Vision-Language Models");
    assert_eq!(
        (coop.year, coop.venue.as_deref()),
        (Some(2022), Some("IJCV"))
    );
    // A row without any evidence stays unknown.
    let gpt4v = ps
        .iter()
        .find(|p| p.model.as_deref() == Some("GPT 4V"))
        .unwrap();
    assert_eq!(
        (gpt4v.year, gpt4v.venue.as_deref(), gpt4v.link.as_deref()),
        (None, None, None)
    );
}

#[test]
fn every_link_is_http_except_the_three_empty_source_links() {
    let ps = papers();
    let mut empty = Vec::new();
    for p in &ps {
        match p.link.as_deref() {
            Some(l) => assert!(
                l.starts_with("http://") || l.starts_with("https://"),
                "{l:?} of {:?}",
                p.display_title()
            ),
            None => empty.push(p.model.clone().unwrap_or_default()),
        }
    }
    // The source list has no link for these three model-summary rows (nor a title).
    assert_eq!(empty, ["Dreamlike Photoreal", "Claude 3 Opus", "GPT 4V"]);
}

#[test]
fn no_duplicate_title_section_rows() {
    let mut seen = BTreeSet::new();
    for p in papers() {
        if let Some(t) = &p.title {
            assert!(
                seen.insert((t.to_lowercase(), p.section.clone())),
                "{t:?} twice in {:?}",
                p.section
            );
        }
    }
    // The same paper may sit in two sections: LLaVA-Med is a model and a VQA paper.
    let llava_med = papers()
        .into_iter()
        .filter(|p| {
            p.title.as_deref()
                == Some("LLaVA-Med: Training a Large Language-and-Vision Assistant for Biomedicine in One Day")
        })
        .map(|p| p.task)
        .collect::<Vec<_>>();
    assert_eq!(llava_med, [Task::Models, Task::Vqa]);
}

#[test]
fn annotations_cover_every_source_paper_and_only_them() {
    let ps = papers();
    let source_keys: BTreeSet<&str> = ps
        .iter()
        .filter(|p| p.task != Task::Method)
        .map(|p| p.key().unwrap())
        .collect();
    let ann_keys: Vec<&str> = ANNOTATIONS_TSV
        .lines()
        .skip(1)
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    let ann_set: BTreeSet<&str> = ann_keys.iter().copied().collect();
    assert_eq!(ann_keys.len(), ann_set.len(), "duplicate annotation keys");
    assert_eq!(ann_set, source_keys);
    // Every annotated field says how it was derived.
    for p in ps.iter().filter(|p| p.task != Task::Method) {
        let basis = p.basis.as_deref().unwrap_or("");
        for (field, set) in [
            ("year:", p.year.is_some()),
            ("venue:", p.venue.is_some()),
            ("strategy:", p.strategy.is_some()),
            ("modality:", p.modality.is_some()),
        ] {
            assert_eq!(
                basis.contains(field),
                set,
                "{field} of {:?}: basis {basis:?}",
                p.display_title()
            );
        }
    }
}

#[test]
fn implementation_docs_exist_and_commands_are_real_subcommands() {
    let ps = papers();
    let docs = doc_paths(&ps);
    assert!(!docs.is_empty());
    for d in &docs {
        assert!(workspace_root().join(d).is_file(), "doc {d} does not exist");
    }
    for s in subcommands_linked(&ps) {
        assert!(SUBCOMMANDS.contains(&s.as_str()), "subcommand {s}");
    }
    for p in &ps {
        for i in &p.implemented_by {
            let sub = i.subcommand().unwrap();
            if let Some(m) = i.method() {
                assert_eq!(sub, "adapt", "{}", i.command);
                assert!(METHODS.contains(&m), "unknown method {m} in {}", i.command);
            }
            assert!(!i.note.is_empty(), "{} has no note", i.command);
        }
    }
    assert_eq!(
        data_lines(IMPLEMENTATIONS_TSV),
        ps.iter().map(|p| p.implemented_by.len()).sum::<usize>()
    );
}

#[test]
fn every_method_name_is_linked_from_a_paper() {
    let linked = method_names_linked(&papers());
    let want: BTreeSet<String> = METHODS.iter().map(|s| s.to_string()).collect();
    assert_eq!(linked, want);
}

#[test]
fn task_papers_link_only_their_task_command() {
    for p in papers() {
        let allowed: &[&str] = match p.task {
            Task::Segmentation => &["segment"],
            Task::AnomalyDetection => &["anomaly"],
            Task::ReportGeneration => &["report"],
            // Detection, registration and super-resolution papers.
            Task::Other => &["detect", "register", "upscale"],
            Task::Vqa => &["vqa"],
            Task::Synthesis => &["synthesize"],
            Task::MultiTask => &["multitask"],
            _ => continue,
        };
        for i in &p.implemented_by {
            assert!(
                allowed.contains(&i.subcommand().unwrap()),
                "{} links {}",
                p.display_title(),
                i.command
            );
            // A task paper is at most the same task, never an implementation of medvlm's.
            assert_eq!(i.relation, Relation::SameTask, "{}", p.display_title());
        }
    }
    // Every task medvlm runs is linked from the papers of that task.
    let linked = subcommands_linked(&papers());
    for sub in [
        "segment",
        "anomaly",
        "report",
        "detect",
        "upscale",
        "register",
        "vqa",
        "synthesize",
        "multitask",
    ] {
        assert!(linked.contains(sub), "{sub}");
    }
}

#[test]
fn method_papers_are_not_already_in_the_source() {
    let ps = papers();
    let source: BTreeSet<String> = ps
        .iter()
        .filter(|p| p.task != Task::Method)
        .filter_map(|p| p.title.as_ref().map(|t| t.to_lowercase()))
        .collect();
    for p in ps.iter().filter(|p| p.task == Task::Method) {
        assert!(!source.contains(&p.title.as_ref().unwrap().to_lowercase()));
        assert!(p.year.is_some() && p.venue.is_some() && p.strategy.is_some());
        assert!(
            !p.implemented_by.is_empty(),
            "{} links nothing",
            p.display_title()
        );
    }
}

#[test]
fn table_is_aligned_and_says_unknown() {
    let ps = papers();
    let rows: Vec<&Paper> = ps
        .iter()
        .filter(|p| p.model.as_deref() == Some("CLIP") || p.model.as_deref() == Some("GPT 4V"))
        .collect();
    let t = render_table(&rows);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("year"));
    let bar = |l: &str| {
        l.char_indices()
            .filter(|(_, c)| *c == '|')
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let pos: Vec<Vec<usize>> = lines.iter().map(|l| bar(l)).collect();
    // All the columns line up (ASCII rows: byte index = column).
    assert_eq!(pos[0], pos[1]);
    assert_eq!(pos[0], pos[2]);
    let cells = |l: &str| {
        l.split(" | ")
            .map(str::trim)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cells(lines[1])[..4],
        ["2021", "ICML", "models", "natural images"]
    );
    assert_eq!(
        cells(lines[1])[5],
        "https://proceedings.mlr.press/v139/radford21a/radford21a.pdf"
    );
    assert_eq!(
        cells(lines[2]),
        [
            "unknown",
            "unknown",
            "models",
            "natural images",
            "GPT 4V",
            "-"
        ]
    );
    // Long titles are truncated.
    let long = ps
        .iter()
        .find(|p| p.title.as_deref().is_some_and(|t| t.chars().count() > 100))
        .unwrap();
    let t = render_table(&[long]);
    assert!(t.contains("..."));
    assert!(!t.contains(long.title.as_deref().unwrap()));
}

#[test]
fn json_form_names_every_field() {
    let ps = papers();
    let clip = ps
        .iter()
        .find(|p| p.model.as_deref() == Some("CLIP"))
        .unwrap();
    let v: serde_json::Value = serde_json::to_value(clip).unwrap();
    assert_eq!(v["year"], 2021);
    assert_eq!(v["venue"], "ICML");
    assert_eq!(v["task"], "models");
    assert_eq!(v["strategy"], "architecture");
    assert_eq!(v["title"], CLIP_TITLE);
    let imps = v["implemented_by"].as_array().unwrap();
    assert!(imps
        .iter()
        .any(|i| i["command"] == "medvlm adapt --method zero-shot"
            && i["doc"] == "docs/methods.md"
            && i["relation"] == "implements"));
}

#[test]
fn errors_name_the_file_and_line() {
    use medvlm_papers::parse_catalogue;
    let bad_year = ANNOTATIONS_TSV.replacen("\t2021\tICML\t", "\t20x1\tICML\t", 1);
    assert_ne!(bad_year, ANNOTATIONS_TSV);
    let e = parse_catalogue(
        PAPERS_TSV,
        METHODS_PAPERS_TSV,
        &bad_year,
        IMPLEMENTATIONS_TSV,
    )
    .unwrap_err()
    .to_string();
    // CLIP is the second data row: line 3.
    assert!(e.starts_with("annotations.tsv:3: year \"20x1\""), "{e}");

    let bad_section = PAPERS_TSV.replacen("\nSegmentation\t", "\nSegmentatoin\t", 1);
    let e = parse_catalogue(
        &bad_section,
        METHODS_PAPERS_TSV,
        ANNOTATIONS_TSV,
        IMPLEMENTATIONS_TSV,
    )
    .unwrap_err()
    .to_string();
    let line = PAPERS_TSV
        .lines()
        .position(|l| l.starts_with("Segmentation\t"))
        .unwrap()
        + 1;
    assert!(
        e.starts_with(&format!("papers.tsv:{line}: section \"Segmentatoin\"")),
        "{e}"
    );

    let orphan = format!("{IMPLEMENTATIONS_TSV}https://example.org/none\tmedvlm adapt\tdocs/adapt.md\tsame-task\tx\n");
    let e = parse_catalogue(PAPERS_TSV, METHODS_PAPERS_TSV, ANNOTATIONS_TSV, &orphan)
        .unwrap_err()
        .to_string();
    let line = orphan.lines().count();
    assert!(
        e.starts_with(&format!("implementations.tsv:{line}: no paper has the key")),
        "{e}"
    );

    let short_row = format!("{METHODS_PAPERS_TSV}method\tX\tonly three fields\n");
    let e = parse_catalogue(PAPERS_TSV, &short_row, ANNOTATIONS_TSV, IMPLEMENTATIONS_TSV)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "methods_papers.tsv:{}:",
            short_row.lines().count()
        )),
        "{e}"
    );

    let twice = format!(
        "{ANNOTATIONS_TSV}{}\n",
        ANNOTATIONS_TSV.lines().nth(2).unwrap()
    );
    let e = parse_catalogue(PAPERS_TSV, METHODS_PAPERS_TSV, &twice, IMPLEMENTATIONS_TSV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("annotated twice (first on line 3)"), "{e}");
}
