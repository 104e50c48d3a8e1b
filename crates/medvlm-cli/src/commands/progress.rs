//! Progress of long work on stderr: an indicatif bar on a terminal, and plain lines with
//! count, rate and time left when stderr is a file or a pipe (a job log, `2> run.log`),
//! where a bar would draw nothing (or a wall of carriage returns).
//!
//! Plain lines come at most every `MEDVLM_PROGRESS_SECS` seconds (default 10; 0 writes one
//! per update), plus one when the work ends, so a log grows by a few lines a minute.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress reporter; see the module documentation.
pub struct Progress {
    bar: ProgressBar,
    /// `Some` when stderr is not a terminal.
    plain: Option<Mutex<Plain>>,
    what: String,
    unit: String,
}

struct Plain {
    start: Instant,
    /// Position when the run (or resumption) started: the rate counts only this run's work.
    first: u64,
    last_line: Option<Instant>,
    interval: Duration,
    message: String,
}

fn interval_from_env() -> Duration {
    let secs = std::env::var("MEDVLM_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(10.0);
    Duration::from_secs_f64(secs)
}

/// `1 h 02 min`, `3 min 05 s`, `12 s`.
fn duration_text(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// Progress over `len` `unit`s (e.g. "images", "updates") of `what`.
    pub fn new(what: &str, len: u64, unit: &str) -> Self {
        let bar = ProgressBar::new(len);
        let terminal = std::io::stderr().is_terminal();
        if terminal {
            let template = format!(
                "{what} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}} {{msg}}"
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self {
            bar,
            plain: (!terminal).then(|| {
                Mutex::new(Plain {
                    start: Instant::now(),
                    first: 0,
                    last_line: None,
                    interval: interval_from_env(),
                    message: String::new(),
                })
            }),
            what: what.to_string(),
            unit: unit.to_string(),
        }
    }

    /// Sets the total (when it is known only later).
    pub fn set_length(&self, len: u64) {
        self.bar.set_length(len);
    }

    /// Marks where this run starts (a resumed run starts past 0).
    pub fn start_at(&self, pos: u64) {
        self.bar.set_position(pos);
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.first = pos;
            p.start = Instant::now();
        }
    }

    /// Moves to `pos`.
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.maybe_line(false);
    }

    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.maybe_line(false);
    }

    /// A short status shown after the counts (e.g. the loss).
    pub fn set_message(&self, msg: String) {
        if let Some(p) = &self.plain {
            p.lock().unwrap_or_else(|e| e.into_inner()).message = msg.clone();
        }
        self.bar.set_message(msg);
    }

    /// Prints a line above the bar (on a terminal) or as is (otherwise).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.plain.is_some() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    /// Ends the progress: clears the bar, or writes the closing plain line.
    pub fn finish(&self) {
        self.maybe_line(true);
        self.bar.finish_and_clear();
    }

    /// Leaves the bar where it is (the work stopped with an error).
    pub fn abandon(&self) {
        self.bar.abandon();
    }

    fn maybe_line(&self, last: bool) {
        let Some(p) = &self.plain else { return };
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = match p.last_line {
            None => now.duration_since(p.start) >= p.interval,
            Some(t) => now.duration_since(t) >= p.interval,
        };
        if !(due || last) {
            return;
        }
        p.last_line = Some(now);
        let pos = self.bar.position();
        let len = self.bar.length().unwrap_or(0);
        let secs = now.duration_since(p.start).as_secs_f64();
        let done = pos.saturating_sub(p.first) as f64;
        let rate = if secs > 0.0 { done / secs } else { 0.0 };
        let mut line = format!("{}: {pos}/{len} {}", self.what, self.unit);
        if len > 0 {
            line.push_str(&format!(" ({:.0} %)", 100.0 * pos as f64 / len as f64));
        }
        line.push_str(&format!(", {rate:.2} {}/s", self.unit));
        if last {
            line.push_str(&format!(", done in {}", duration_text(secs)));
        } else if rate > 0.0 && len > pos {
            line.push_str(&format!(
                ", eta {}",
                duration_text((len - pos) as f64 / rate)
            ));
        }
        if !p.message.is_empty() {
            line.push_str(&format!(", {}", p.message));
        }
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::duration_text;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(12.4), "12 s");
        assert_eq!(duration_text(185.0), "3 min 05 s");
        assert_eq!(duration_text(3720.0), "1 h 02 min");
    }
}
