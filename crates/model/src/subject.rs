//! What a NATS subject an extension listens on may look like.
//!
//! Any subject NATS accepts for publishing, minus wildcards: tokens separated by `.`,
//! none empty, no whitespace or control characters, no `*` or `>` (a wildcard would
//! publish nowhere), at most 512 bytes. Unlike the original's regex this accepts
//! every subject the original itself ships (`beamline.ext.validate.*`,
//! `beamline.provider.*`).

/// Longest subject a record may carry (REFERENCE.md §1).
pub const MAX_SUBJECT_LEN: usize = 512;

/// Returns why `subject` is not a valid, wildcard-free NATS subject.
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("must not be empty".into());
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "is {} bytes, longer than {MAX_SUBJECT_LEN}",
            subject.len()
        ));
    }
    for (i, token) in subject.split('.').enumerate() {
        if token.is_empty() {
            return Err(format!(
                "'{subject}' has an empty token at position {} (leading, trailing or doubled '.')",
                i + 1
            ));
        }
        if token == "*" || token == ">" || token.contains(['*', '>']) {
            return Err(format!(
                "'{subject}' contains a wildcard ('*' or '>'); an extension needs one concrete subject"
            ));
        }
        if let Some(c) = token.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "'{}' contains the character {:?}, which NATS subjects do not allow",
                subject.escape_debug(),
                c
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_subjects_are_valid() {
        for s in [
            "beamline.ext.pre.normalize_text.v1",
            "beamline.ext.validate.pii_guard.v1",
            "beamline.ext.post.mask_pii.v1",
            "beamline.provider.test_provider.v1",
        ] {
            assert!(check_subject(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn wildcards_and_broken_subjects_are_refused() {
        for s in [
            "", "a.*.b", "a.>", "a..b", ".a", "a.", "a b", "a.\tb", "a.b*", "a.\u{0}",
        ] {
            assert!(check_subject(s).is_err(), "{s:?} should be refused");
        }
        assert!(check_subject(&"a".repeat(513)).is_err());
    }
}
