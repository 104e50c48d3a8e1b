//! Decoders from other crates that may panic on malformed input (index out of bounds in an
//! RLE or pickle reader) are run through [`quiet_catch`], so a damaged file becomes that
//! file's error instead of a panic and a backtrace.

/// Run `f`, turning a panic into an error message (without the default panic
/// hook printing it: the message goes into the file's error instead).
pub fn quiet_catch<R>(f: impl FnOnce() -> R) -> std::result::Result<R, String> {
    use std::cell::Cell;
    thread_local! { static QUIET: Cell<u32> = const { Cell::new(0) }; }
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) == 0 {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(q.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get() - 1));
    r.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("the decoder failed on this file's data (internal panic: {msg})")
    })
}

/// An error and its causes on one line, without repeating what an outer message already
/// says. Many error types both print their cause and return it as `source()` (the I/O
/// errors of std and most crates' wrappers), and contexts name the file that the inner error
/// names again, so a plain `{:#}` reads "reading x: x: Is a directory: Is a directory".
/// Here a cause already contained in the line is left out, and a cause that starts with a
/// path (or other text up to ": ") already in the line loses that prefix. The `medvlm`
/// binary reports its errors with it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = without_backtrace(&e.to_string());
    let mut cur = e.source();
    while let Some(cause) = cur {
        cur = cause.source();
        let mut text = without_backtrace(&cause.to_string());
        if line.contains(text.as_str()) {
            continue;
        }
        // Strip leading "A: B: " segments that the line already holds, also when one word
        // precedes a path the line names ("image scans/x.png: ...").
        let known = |head: &str| {
            line.contains(head)
                || head.split_once(' ').is_some_and(|(_, path)| {
                    (path.contains('/') || path.contains('.')) && line.contains(path)
                })
        };
        while let Some((head, rest)) = text.split_once(": ") {
            if !head.is_empty() && known(head) && !rest.is_empty() {
                text = rest.to_string();
            } else {
                break;
            }
        }
        if line.contains(text.as_str()) {
            continue;
        }
        line.push_str(": ");
        line.push_str(&text);
    }
    line
}

/// A message without the stack trace some errors append to it (candle's errors carry one
/// when `RUST_BACKTRACE` is set: lines `   0: frame`, `   1: ...`), which is noise in a
/// user-facing message.
fn without_backtrace(msg: &str) -> String {
    let is_frame = |l: &str| {
        let t = l.trim_start();
        t.split_once(':')
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && l.starts_with(' ')
    };
    match msg.lines().position(is_frame) {
        Some(0) | None => msg.to_string(),
        Some(i) => msg
            .lines()
            .take(i)
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug)]
    struct WithTrace;
    impl std::fmt::Display for WithTrace {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "unsupported dtype BF16 for op matmul\n   0: candle_core::error::Error::bt\n   \
                 1: rayon::iter::plumbing::bridge\n             at ./src/x.rs:3:4"
            )
        }
    }
    impl std::error::Error for WithTrace {}

    #[test]
    fn stack_traces_inside_messages_are_dropped() {
        assert_eq!(
            error_chain(&WithTrace),
            "unsupported dtype BF16 for op matmul"
        );
        // A message whose own lines are not frames is kept whole.
        let io = std::io::Error::other("line one\nline two: detail");
        assert_eq!(error_chain(&io), "line one\nline two: detail");
    }
}
