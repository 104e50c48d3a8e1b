//! Reading the JSON cards of the task artefacts (segmenter, detector, upscaler, answerers,
//! report generator, ...): every folder a task writes has one, with a `format` field naming
//! its kind and version, and every reader refuses the same things the same way.

use std::path::Path;

/// Reads the JSON card `dir/card_file` whose `format` field (`format_of`) must be `format`.
/// A missing or unreadable file, text that is not a `what` card, or another format is an error
/// made by `file_err` with the card's path and the reason.
pub(crate) fn read_json_card<C: serde::de::DeserializeOwned, E>(
    dir: &Path,
    card_file: &str,
    format: &str,
    what: &str,
    format_of: impl Fn(&C) -> &str,
    file_err: impl Fn(&Path, String) -> E,
) -> Result<C, E> {
    let card_path = dir.join(card_file);
    let text =
        std::fs::read_to_string(&card_path).map_err(|e| file_err(&card_path, e.to_string()))?;
    let card: C = serde_json::from_str(&text)
        .map_err(|e| file_err(&card_path, format!("not a {what} card: {e}")))?;
    if format_of(&card) != format {
        return Err(file_err(
            &card_path,
            format!("format `{}`, expected `{format}`", format_of(&card)),
        ));
    }
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Card {
        format: String,
        n: u32,
    }

    fn read(dir: &Path) -> Result<Card, String> {
        read_json_card(
            dir,
            "c.json",
            "test-v1",
            "test",
            |c: &Card| &c.format,
            |p, r| format!("{}: {r}", p.display()),
        )
    }

    #[test]
    fn reads_a_card_and_names_the_file_and_reason_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let e = read(dir.path()).err().unwrap();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        std::fs::write(&path, r#"{"format": "test-v1", "n": 3}"#).unwrap();
        assert_eq!(read(dir.path()).unwrap().n, 3);
        std::fs::write(&path, r#"{"format": "test-v2", "n": 3}"#).unwrap();
        let e = read(dir.path()).err().unwrap();
        assert!(
            e.contains("c.json") && e.contains("format `test-v2`, expected `test-v1`"),
            "{e}"
        );
        std::fs::write(&path, "[1]").unwrap();
        let e = read(dir.path()).err().unwrap();
        assert!(e.contains("c.json") && e.contains("not a test card"), "{e}");
    }
}
