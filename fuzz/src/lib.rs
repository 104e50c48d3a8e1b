//! A coverage-less mutational fuzz harness for medvlm's file readers that
//! builds on stable Rust (cargo-fuzz/libFuzzer need nightly). See `fuzz/README.md`.
//!
//! - [`targets`]: the public entry points driven, the seed files, the per-format
//!   token dictionaries;
//! - [`mutate`]: stacked byte mutations, splicing, and zip/gzip-aware mutation;
//! - [`Fuzzer`]: the loop (pick, mutate, write to a temp file, run under
//!   `catch_unwind`), with a small "new error message" feedback that grows the pool;
//! - a capped global allocator: a request above [`set_alloc_cap`] fails, which
//!   makes `try_reserve` return an error and an infallible allocation abort the
//!   process (the `medvlm-fuzz` supervisor records that as a crash).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub mod mutate;
pub mod targets;

pub use targets::{Target, ALL};

// ---------------------------------------------------------------- allocator --

/// The global allocator: the system allocator with a per-request size cap.
pub struct CapAlloc;

static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged, except that requests
// above the cap return null, which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP.load(Ordering::Relaxed) {
            REFUSED.store(layout.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP.load(Ordering::Relaxed) {
            REFUSED.store(layout.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP.load(Ordering::Relaxed) {
            REFUSED.store(new_size, Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CapAlloc = CapAlloc;

/// Refuse any single allocation larger than `bytes`.
pub fn set_alloc_cap(bytes: usize) {
    CAP.store(bytes, Ordering::Relaxed);
}

/// Size of the last refused allocation (0 if none), for reports.
pub fn last_refused_allocation() -> usize {
    REFUSED.load(Ordering::Relaxed)
}

// ------------------------------------------------------------- panic capture --

static LAST_PANIC: Mutex<Option<(String, String, std::backtrace::Backtrace)>> = Mutex::new(None);

/// Replace the panic hook by one that prints nothing and remembers the message,
/// location and (unresolved) backtrace of the last panic.
pub fn install_silent_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = payload_message(info.payload());
        let loc = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "<unknown>".into());
        let bt = std::backtrace::Backtrace::force_capture();
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some((msg, loc, bt));
    }));
}

fn payload_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".into()
    }
}

/// Backtrace frames from medvlm's own crates (the useful part for a report).
fn medvlm_frames(bt: &std::backtrace::Backtrace) -> String {
    let text = bt.to_string();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if t.starts_with("at ") && (t.contains("medvlm-") || t.contains("/crates/")) {
            if let Some(f) = lines.get(i.wrapping_sub(1)) {
                out.push(format!("{}\n  {}", f.trim(), t));
            }
        }
    }
    if out.is_empty() {
        text
    } else {
        out.join("\n")
    }
}

// ------------------------------------------------------------------ running --

/// The result of one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The reader accepted the input.
    Ok,
    /// The reader returned an error (normal for garbage).
    Err(String),
    /// The reader panicked: a bug.
    Panic {
        /// `file:line:col` of the panic.
        location: String,
        /// The panic message.
        message: String,
        /// medvlm frames of the backtrace.
        backtrace: String,
    },
}

impl Outcome {
    /// A short key grouping equal bugs: the panic location plus the message
    /// with numbers blanked.
    pub fn signature(&self) -> Option<String> {
        match self {
            Outcome::Panic {
                location, message, ..
            } => Some(format!(
                "panic at {location}: {}",
                normalise(message.lines().next().unwrap_or(""), "")
            )),
            _ => None,
        }
    }
}

/// Digits blanked, the temp folder removed, cut to 120 characters.
pub fn normalise(msg: &str, workdir: &str) -> String {
    let msg = if workdir.is_empty() {
        msg.to_string()
    } else {
        msg.replace(workdir, "")
    };
    let mut out = String::new();
    let mut last_digit = false;
    for c in msg.chars() {
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('#');
            }
            last_digit = true;
        } else {
            out.push(c);
            last_digit = false;
        }
        if out.len() >= 120 {
            break;
        }
    }
    out
}

/// Write `bytes` to `workdir/input.<ext>` and run `target` on it under `catch_unwind`.
pub fn run_one(target: Target, workdir: &Path, bytes: &[u8]) -> Outcome {
    let path = input_path(target, workdir, bytes);
    if let Err(e) = std::fs::write(&path, bytes) {
        return Outcome::Err(format!("harness: cannot write {}: {e}", path.display()));
    }
    *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match std::panic::catch_unwind(AssertUnwindSafe(|| target.run(&path, bytes))) {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(m)) => Outcome::Err(m),
        Err(payload) => {
            let hooked = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            let (message, location, backtrace) = match hooked {
                Some((m, l, bt)) => (m, l, medvlm_frames(&bt)),
                None => (
                    payload_message(&*payload),
                    "<unknown>".into(),
                    String::new(),
                ),
            };
            Outcome::Panic {
                location,
                message,
                backtrace,
            }
        }
    }
}

/// Where [`run_one`] writes an input.
pub fn input_path(target: Target, workdir: &Path, bytes: &[u8]) -> PathBuf {
    workdir.join(format!("input.{}", target.extension(bytes)))
}

/// 64-bit FNV-1a, for crash file names.
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Save a crashing input as `dir/<hash>.bin` with `dir/<hash>.txt` describing it.
/// Returns the `.bin` path.
pub fn save_crash(
    dir: &Path,
    target: Target,
    bytes: &[u8],
    signature: &str,
    details: &str,
) -> PathBuf {
    let _ = std::fs::create_dir_all(dir);
    let stem = format!("{:016x}", fnv64(bytes));
    let bin = dir.join(format!("{stem}.bin"));
    let _ = std::fs::write(&bin, bytes);
    let txt = format!(
        "target: {}\nsignature: {signature}\nreplay: cargo run -p medvlm-fuzz --release -- replay {} {}\n\n{details}\n",
        target.name(),
        target.name(),
        bin.display()
    );
    let _ = std::fs::write(dir.join(format!("{stem}.txt")), txt);
    bin
}

/// How many inputs per signature are already saved in `dir` (from the `.txt` files).
pub fn saved_signatures(dir: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "txt") {
            if let Ok(t) = std::fs::read_to_string(&p) {
                if let Some(sig) = t.lines().find_map(|l| l.strip_prefix("signature: ")) {
                    *out.entry(sig.to_string()).or_insert(0) += 1;
                }
            }
        }
    }
    out
}

/// Counts for one run of one target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Inputs executed.
    pub execs: u64,
    /// Inputs the reader accepted.
    pub ok: u64,
    /// Panics (and, in the supervisor, aborts).
    pub crashes: u64,
    /// Inputs that ran past the hang limit.
    pub hangs: u64,
    /// Crash signatures with their counts.
    pub signatures: BTreeMap<String, u64>,
    /// Inputs in the pool at the end.
    pub pool: u64,
}

impl Stats {
    /// Add another run's counts.
    pub fn merge(&mut self, o: &Stats) {
        self.execs += o.execs;
        self.ok += o.ok;
        self.crashes += o.crashes;
        self.hangs += o.hangs;
        self.pool = self.pool.max(o.pool);
        for (k, v) in &o.signatures {
            *self.signatures.entry(k.clone()).or_insert(0) += v;
        }
    }

    /// A line-based text form (read back by [`Stats::from_text`]).
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "execs {}\nok {}\ncrashes {}\nhangs {}\npool {}\n",
            self.execs, self.ok, self.crashes, self.hangs, self.pool
        );
        for (k, v) in &self.signatures {
            s.push_str(&format!("sig {v}\t{}\n", k.replace('\n', " ")));
        }
        s
    }

    /// Parse [`Stats::to_text`].
    pub fn from_text(t: &str) -> Stats {
        let mut s = Stats::default();
        for l in t.lines() {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            let n = || v.parse::<u64>().unwrap_or(0);
            match k {
                "execs" => s.execs = n(),
                "ok" => s.ok = n(),
                "crashes" => s.crashes = n(),
                "hangs" => s.hangs = n(),
                "pool" => s.pool = n(),
                "sig" => {
                    if let Some((c, sig)) = v.split_once('\t') {
                        s.signatures.insert(sig.to_string(), c.parse().unwrap_or(0));
                    }
                }
                _ => {}
            }
        }
        s
    }
}

/// Inputs kept per crash signature in the crash folder.
pub const KEEP_PER_SIGNATURE: usize = 3;
const MAX_POOL: usize = 2000;
const MAX_ERROR_KINDS: usize = 20_000;

/// The fuzzing loop for one target.
pub struct Fuzzer {
    /// The target.
    pub target: Target,
    rng: ChaCha8Rng,
    seeds: Vec<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    error_kinds: HashSet<String>,
    workdir: PathBuf,
    workdir_str: String,
    crash_dir: Option<PathBuf>,
    saved: HashMap<String, usize>,
    seed: u64,
    /// Counts so far.
    pub stats: Stats,
}

impl Fuzzer {
    /// A fuzzer for `target` with seeds from `root` (workspace root) and `corpus`,
    /// writing inputs in `workdir` and crashes in `crash_dir` (none: not saved).
    pub fn new(
        target: Target,
        root: &Path,
        corpus: Option<&Path>,
        workdir: &Path,
        crash_dir: Option<&Path>,
        seed: u64,
    ) -> Fuzzer {
        let seeds: Vec<Vec<u8>> = target
            .seeds(root, corpus)
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let saved = crash_dir.map(saved_signatures).unwrap_or_default();
        Fuzzer {
            target,
            rng: ChaCha8Rng::seed_from_u64(seed),
            pool: seeds.clone(),
            seeds,
            error_kinds: HashSet::new(),
            workdir: workdir.to_path_buf(),
            workdir_str: workdir.to_string_lossy().into_owned(),
            crash_dir: crash_dir.map(Path::to_path_buf),
            saved,
            seed,
            stats: Stats::default(),
        }
    }

    /// Number of seed inputs.
    pub fn n_seeds(&self) -> usize {
        self.seeds.len()
    }

    /// Run every seed unmutated (they must not crash either).
    pub fn run_seeds(&mut self) {
        for i in 0..self.seeds.len() {
            let s = self.seeds[i].clone();
            self.exec(s);
        }
    }

    /// One mutated input.
    pub fn step(&mut self) -> Outcome {
        let n = self.pool.len();
        let input = if n == 0 {
            self.target.mutate(&mut self.rng, &[], &[])
        } else {
            let a = self.rng.random_range(0..n);
            let b = self.rng.random_range(0..n);
            let (pa, pb) = (&self.pool[a], &self.pool[b]);
            self.target.mutate(&mut self.rng, pa, pb)
        };
        let bytes = self.target.prepare(&mut self.rng, input);
        self.exec(bytes)
    }

    fn exec(&mut self, bytes: Vec<u8>) -> Outcome {
        let out = run_one(self.target, &self.workdir, &bytes);
        self.stats.execs += 1;
        match &out {
            Outcome::Ok => {
                self.stats.ok += 1;
                if self.rng.random_bool(1.0 / 16.0) {
                    self.add_to_pool(bytes);
                }
            }
            Outcome::Err(m) => {
                if self.error_kinds.len() < MAX_ERROR_KINDS {
                    let kind = normalise(m, &self.workdir_str);
                    if self.error_kinds.insert(kind) {
                        self.add_to_pool(bytes);
                    }
                }
            }
            Outcome::Panic {
                location,
                message,
                backtrace,
            } => {
                let sig = out.signature().unwrap_or_default();
                self.stats.crashes += 1;
                *self.stats.signatures.entry(sig.clone()).or_insert(0) += 1;
                if let Some(dir) = &self.crash_dir {
                    let n = self.saved.entry(sig.clone()).or_insert(0);
                    if *n < KEEP_PER_SIGNATURE {
                        *n += 1;
                        let details = format!(
                            "kind: panic\nfuzz seed: {}\nlocation: {location}\nmessage: {message}\n\nbacktrace (medvlm frames):\n{backtrace}",
                            self.seed
                        );
                        save_crash(dir, self.target, &bytes, &sig, &details);
                    }
                }
            }
        }
        self.stats.pool = self.pool.len() as u64;
        out
    }

    fn add_to_pool(&mut self, bytes: Vec<u8>) {
        if self.pool.len() < MAX_POOL {
            self.pool.push(bytes);
        } else if self.pool.len() > self.seeds.len() {
            let i = self.rng.random_range(self.seeds.len()..self.pool.len());
            self.pool[i] = bytes;
        }
    }
}

/// The workspace root this crate was built in.
pub fn default_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ has a parent")
        .to_path_buf()
}

/// A fresh per-process scratch folder for inputs.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "medvlm-fuzz-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Run the seeds plus `iterations` mutated inputs in this process (no crash
/// files, no hang detection); used by the tests.
pub fn fuzz_in_process(target: Target, root: &Path, iterations: u64, seed: u64) -> Stats {
    install_silent_panic_hook();
    let dir = scratch_dir(target.name());
    let mut f = Fuzzer::new(target, root, None, &dir, None, seed);
    f.run_seeds();
    for _ in 0..iterations {
        f.step();
    }
    let _ = std::fs::remove_dir_all(&dir);
    f.stats
}

/// Replay one saved input in this process.
pub fn replay(target: Target, bytes: &[u8]) -> Outcome {
    install_silent_panic_hook();
    let dir = scratch_dir(&format!("replay-{}", target.name()));
    let out = run_one(target, &dir, bytes);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
