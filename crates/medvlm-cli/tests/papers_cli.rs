//! `medvlm papers` and the catalogue kept in sync with the program: every adaptation method
//! `medvlm adapt` accepts is linked from at least one paper, and every command a paper links
//! to is a subcommand of this binary (its `--help` runs).

use std::process::{Command, Output};

fn medvlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(args)
        .output()
        .expect("run medvlm")
}

#[test]
fn every_adapt_method_is_linked_and_every_linked_command_exists() {
    let papers = medvlm_papers::catalogue().unwrap();
    let linked = medvlm_papers::method_names_linked(&papers);
    for m in medvlm_adapt::method::METHOD_NAMES {
        assert!(linked.contains(*m), "method {m} is linked from no paper");
    }
    for m in &linked {
        assert!(
            medvlm_adapt::method::METHOD_NAMES.contains(&m.as_str()),
            "a paper links to --method {m}, which medvlm adapt does not accept"
        );
    }
    let subs = medvlm_papers::subcommands_linked(&papers);
    assert!(
        subs.contains("adapt") && subs.contains("pretrain"),
        "{subs:?}"
    );
    for sub in subs {
        let r = medvlm(&[&sub, "--help"]);
        assert!(
            r.status.success(),
            "medvlm {sub} --help failed: a paper links to it"
        );
    }
}

#[test]
fn papers_filters_and_shows_the_commands() {
    let r = medvlm(&["papers", "--task", "models", "--search", "clip"]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.contains("Learning Transferable Visual Models"), "{out}");
    assert!(out.contains("medvlm adapt --method zero-shot"), "{out}");

    let r = medvlm(&["papers", "--implemented", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert!(!list.is_empty());
    assert!(list
        .iter()
        .all(|p| !p["implemented_by"].as_array().unwrap().is_empty()));
    let all = medvlm_papers::catalogue().unwrap();
    assert!(list.len() < all.len());

    // Each task's papers link its command (segmentation, VQA, synthesis, multi-task).
    for (task, command) in [
        ("segmentation", "medvlm segment"),
        ("vqa", "medvlm vqa"),
        ("synthesis", "medvlm synthesize"),
        ("multi-task", "medvlm multitask"),
    ] {
        let r = medvlm(&["papers", "--task", task, "--implemented"]);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(out.contains(command), "{task}: {out}");
    }

    let r = medvlm(&["papers", "--task", "astrology"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("astrology"), "{err}");
}
