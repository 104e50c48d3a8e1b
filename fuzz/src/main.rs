//! `medvlm-fuzz TARGET|all --seconds N [--seed S] [--corpus DIR]`: run the
//! stable-Rust fuzz harness. Each target runs in a child process (the worker)
//! so that an abort (a refused huge allocation, a stack overflow) or a hang is
//! recorded as a crash and fuzzing continues in a fresh worker.
//!
//! Other forms:
//! - `medvlm-fuzz replay TARGET FILE...`: run saved inputs once and print the outcome;
//! - `medvlm-fuzz list`: the targets and their seed counts.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medvlm_fuzz::{
    default_root, install_silent_panic_hook, normalise, replay, save_crash, saved_signatures,
    scratch_dir, set_alloc_cap, Fuzzer, Outcome, Stats, Target, ALL, KEEP_PER_SIGNATURE,
};

/// Exit code of a worker that stopped on a hang.
const HANG_EXIT: i32 = 86;

const USAGE: &str = "usage:
  medvlm-fuzz TARGET|all [--seconds N] [--seed S] [--corpus DIR] [--crashes DIR]
                         [--max-alloc-mb M] [--hang-secs H]
  medvlm-fuzz replay TARGET FILE...
  medvlm-fuzz list
targets: dicom nifti npy (alias npz) manifest-jsonl manifest-csv train-config pickle
defaults: --seconds 60 (per target), --seed 0, --crashes fuzz/crashes,
          --max-alloc-mb 1024 (a larger single allocation is a crash), --hang-secs 10";

#[derive(Debug, Clone)]
struct Opts {
    seconds: f64,
    seed: u64,
    corpus: Option<PathBuf>,
    crashes: PathBuf,
    max_alloc_mb: usize,
    hang_secs: f64,
    // Worker-only.
    until_ms: u64,
    workdir: Option<PathBuf>,
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 60.0,
        seed: 0,
        corpus: None,
        crashes: default_root().join("fuzz/crashes"),
        max_alloc_mb: 1024,
        hang_secs: 10.0,
        until_ms: 0,
        workdir: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        let num = |s: String| {
            s.parse::<f64>()
                .map_err(|_| format!("{a}: not a number: {s}"))
        };
        match a.as_str() {
            "--seconds" => o.seconds = num(val()?)?,
            "--seed" => o.seed = num(val()?)? as u64,
            "--corpus" => o.corpus = Some(PathBuf::from(val()?)),
            "--crashes" => o.crashes = PathBuf::from(val()?),
            "--max-alloc-mb" => o.max_alloc_mb = num(val()?)? as usize,
            "--hang-secs" => o.hang_secs = num(val()?)?,
            "--until-ms" => o.until_ms = num(val()?)? as u64,
            "--workdir" => o.workdir = Some(PathBuf::from(val()?)),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match cmd.as_str() {
        "-h" | "--help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        "list" => {
            for t in ALL {
                println!(
                    "{:16} {} seeds",
                    t.name(),
                    t.seeds(&default_root(), None).len()
                );
            }
            ExitCode::SUCCESS
        }
        "replay" => replay_cmd(&args[1..]),
        "__worker" => worker(&args[1..]),
        _ => {
            let targets: Vec<Target> = if cmd == "all" {
                ALL.to_vec()
            } else {
                match Target::from_name(cmd) {
                    Some(t) => vec![t],
                    None => {
                        eprintln!("unknown target {cmd}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            };
            let opts = match parse_opts(&args[1..]) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("{e}\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            supervise_all(&targets, &opts)
        }
    }
}

fn replay_cmd(args: &[String]) -> ExitCode {
    let Some(t) = args.first().and_then(|n| Target::from_name(n)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    set_alloc_cap(1024 << 20);
    let mut bad = false;
    for f in &args[1..] {
        let bytes = match std::fs::read(f) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{f}: {e}");
                bad = true;
                continue;
            }
        };
        let start = Instant::now();
        let out = replay(t, &bytes);
        let dt = start.elapsed().as_secs_f64();
        match out {
            Outcome::Ok => println!("{f}: ok ({dt:.3} s)"),
            Outcome::Err(m) => println!("{f}: error ({dt:.3} s): {m}"),
            Outcome::Panic {
                location,
                message,
                backtrace,
            } => {
                bad = true;
                println!("{f}: PANIC at {location}: {message}\n{backtrace}");
            }
        }
    }
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ------------------------------------------------------------------ worker --

fn worker(args: &[String]) -> ExitCode {
    let Some(target) = args.first().and_then(|n| Target::from_name(n)) else {
        return ExitCode::from(2);
    };
    let opts = match parse_opts(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(workdir) = opts.workdir.clone() else {
        return ExitCode::from(2);
    };
    set_alloc_cap(opts.max_alloc_mb << 20);
    install_silent_panic_hook();
    let crash_dir = opts.crashes.join(target.name());
    let stats_path = workdir.join("stats.txt");

    // Watchdog: an input running longer than the hang limit is saved as a hang
    // and the worker exits (a thread cannot be stopped; the supervisor restarts).
    let started = Arc::new(AtomicU64::new(0));
    {
        let started = started.clone();
        let workdir = workdir.clone();
        let crash_dir = crash_dir.clone();
        let hang_ms = (opts.hang_secs * 1000.0) as u64;
        let seed = opts.seed;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let s = started.load(Ordering::Relaxed);
            if s != 0 && now_ms().saturating_sub(s) > hang_ms {
                if let Some((path, bytes)) = newest_input(&workdir) {
                    let sig = format!("hang: input ran longer than {} s", hang_ms / 1000);
                    let details = format!(
                        "kind: hang\nfuzz seed: {seed}\nfile: {}\n",
                        path.file_name().unwrap_or_default().to_string_lossy()
                    );
                    save_crash(&crash_dir, target, &bytes, &sig, &details);
                }
                std::process::exit(HANG_EXIT);
            }
        });
    }

    let mut f = Fuzzer::new(
        target,
        &default_root(),
        opts.corpus.as_deref(),
        &workdir,
        Some(&crash_dir),
        opts.seed,
    );
    let mut last_write = Instant::now();
    let mut first = true;
    loop {
        started.store(now_ms().max(1), Ordering::Relaxed);
        if first {
            f.run_seeds();
            first = false;
        } else {
            f.step();
        }
        started.store(0, Ordering::Relaxed);
        if last_write.elapsed() > Duration::from_millis(500) {
            let _ = std::fs::write(&stats_path, f.stats.to_text());
            last_write = Instant::now();
        }
        if now_ms() >= opts.until_ms {
            break;
        }
    }
    let _ = std::fs::write(&stats_path, f.stats.to_text());
    ExitCode::SUCCESS
}

/// From a dead worker's stderr: the reason (allocation failure, stack
/// overflow, ...) and the first backtrace frame outside std and this harness.
fn abort_reason(stderr: &str) -> (String, String) {
    let lines: Vec<&str> = stderr.lines().collect();
    let markers = [
        "memory allocation of",
        "has overflowed its stack",
        "panicked",
        "fatal runtime error",
    ];
    let at = lines
        .iter()
        .position(|l| markers.iter().any(|m| l.contains(m)));
    let reason = match at {
        Some(i) => lines[i].trim().to_string(),
        None => lines
            .last()
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| "(no message)".into()),
    };
    let frame = lines[at.unwrap_or(0)..]
        .iter()
        .filter_map(|l| l.trim().strip_prefix("at "))
        .find(|l| !l.starts_with("/rustc/") && !l.contains("fuzz/src/"))
        .map(|l| {
            let l = l.trim_start_matches("./");
            match l.find("index.crates.io-") {
                Some(i) => l[i..].split_once('/').map(|(_, r)| r).unwrap_or(l),
                None => l,
            }
            .to_string()
        })
        .unwrap_or_else(|| "<no frame>".into());
    (reason, frame)
}

/// The most recently written `input.*` in `dir`.
fn newest_input(dir: &Path) -> Option<(PathBuf, Vec<u8>)> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let is_input = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("input."));
        if !is_input {
            continue;
        }
        let t = e.metadata().and_then(|m| m.modified()).ok()?;
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, p));
        }
    }
    let (_, p) = best?;
    let bytes = std::fs::read(&p).ok()?;
    Some((p, bytes))
}

// -------------------------------------------------------------- supervisor --

fn supervise_all(targets: &[Target], opts: &Opts) -> ExitCode {
    let mut found = false;
    let mut summaries = Vec::new();
    for &t in targets {
        let (stats, secs) = supervise(t, opts);
        found |= stats.crashes > 0 || stats.hangs > 0;
        summaries.push((t, stats, secs));
    }
    println!("\n== summary ==");
    println!(
        "{:16} {:>10} {:>9} {:>9} {:>8} {:>6} {:>6}",
        "target", "inputs", "exec/s", "accepted", "crashes", "hangs", "kinds"
    );
    for (t, s, secs) in &summaries {
        println!(
            "{:16} {:>10} {:>9.1} {:>9} {:>8} {:>6} {:>6}",
            t.name(),
            s.execs,
            s.execs as f64 / secs.max(1e-9),
            s.ok,
            s.crashes,
            s.hangs,
            s.signatures.len()
        );
    }
    for (t, s, _) in &summaries {
        for (sig, n) in &s.signatures {
            println!("  {} x{n}: {sig}", t.name());
        }
    }
    if found {
        println!(
            "crashes or hangs found: inputs are under {}",
            opts.crashes.display()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Run `target` for `opts.seconds` in successive workers; returns the merged
/// stats and the seconds spent.
fn supervise(target: Target, opts: &Opts) -> (Stats, f64) {
    let start = Instant::now();
    let until = now_ms() + (opts.seconds * 1000.0) as u64;
    let exe = std::env::current_exe().expect("current executable");
    let crash_dir = opts.crashes.join(target.name());
    let mut total = Stats::default();
    let mut restarts = 0u64;
    println!(
        "[{}] fuzzing for {:.0} s (seed {}, {} seeds)",
        target.name(),
        opts.seconds,
        opts.seed,
        target.seeds(&default_root(), opts.corpus.as_deref()).len()
    );
    loop {
        let workdir = scratch_dir(target.name());
        let stderr_path = workdir.join("stderr.txt");
        let stderr = std::fs::File::create(&stderr_path).expect("create worker stderr file");
        // A restarted worker gets a different seed, derived reproducibly.
        let seed = opts
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(restarts);
        let mut cmd = Command::new(&exe);
        cmd.arg("__worker")
            .arg(target.name())
            .args(["--until-ms", &until.to_string()])
            .args(["--seed", &seed.to_string()])
            .arg("--workdir")
            .arg(&workdir)
            .arg("--crashes")
            .arg(&opts.crashes)
            .args(["--max-alloc-mb", &opts.max_alloc_mb.to_string()])
            .args(["--hang-secs", &opts.hang_secs.to_string()])
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        if let Some(c) = &opts.corpus {
            cmd.arg("--corpus").arg(c);
        }
        let status = cmd.status().expect("spawn worker");
        let mut s = Stats::from_text(
            &std::fs::read_to_string(workdir.join("stats.txt")).unwrap_or_default(),
        );
        match status.code() {
            Some(0) => {}
            Some(HANG_EXIT) => {
                s.hangs += 1;
                s.execs += 1;
                println!("[{}] hang (worker restarted)", target.name());
            }
            other => {
                // Aborted: out of memory (a refused huge allocation), stack overflow, ...
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let (reason, frame) = abort_reason(&err);
                let sig = format!("abort: {} at {frame}", normalise(&reason, ""));
                let last = format!("{reason} at {frame}");
                let code = match other {
                    Some(c) => format!("exit code {c}"),
                    None => "killed by a signal".into(),
                };
                println!("[{}] worker died ({code}): {last}", target.name());
                s.crashes += 1;
                s.execs += 1;
                *s.signatures.entry(sig.clone()).or_insert(0) += 1;
                let n = saved_signatures(&crash_dir).get(&sig).copied().unwrap_or(0);
                if n < KEEP_PER_SIGNATURE {
                    if let Some((path, bytes)) = newest_input(&workdir) {
                        let details = format!(
                            "kind: abort ({code})\nfuzz seed: {seed}\nfile: {}\nworker stderr:\n{}\n",
                            path.file_name().unwrap_or_default().to_string_lossy(),
                            err.chars().take(20_000).collect::<String>()
                        );
                        save_crash(&crash_dir, target, &bytes, &sig, &details);
                    }
                }
            }
        }
        total.merge(&s);
        let _ = std::fs::remove_dir_all(&workdir);
        restarts += 1;
        if now_ms() + 200 >= until || restarts > 500 {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "[{}] {} inputs in {:.0} s ({:.1}/s), {} accepted, {} crashes, {} hangs, pool {}, {} workers",
        target.name(),
        total.execs,
        secs,
        total.execs as f64 / secs.max(1e-9),
        total.ok,
        total.crashes,
        total.hangs,
        total.pool,
        restarts
    );
    for (sig, n) in &total.signatures {
        println!("[{}]   x{n}: {sig}", target.name());
    }
    (total, secs)
}
