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

/// An error and its causes on one line, each cause left out when the text so far already
/// holds it (many errors print their source and also return it from `source()`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = inner.source();
    }
    s
}
