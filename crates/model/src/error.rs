//! The error every validation returns: which field, and why.

use std::fmt;

/// A value that failed validation. `field` is a path inside the record
/// (`timeout_ms`, `routing_rules.tenant_id`, `pre[2].mode`); the caller adds where the
/// record came from (a file, a table row), so the whole message names what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// Path of the offending field inside the record.
    pub field: String,
    /// What is wrong with it, in words an operator can act on.
    pub reason: String,
    /// The error name of REFERENCE.md §6 when one applies (`timeout_out_of_range`, …).
    pub code: Option<&'static str>,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Prefixes the field path, for errors found inside a nested value.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)?;
        } else {
            write!(f, "field `{}`: {}", self.field, self.reason)?;
        }
        if let Some(code) = self.code {
            write!(f, " ({code})")?;
        }
        Ok(())
    }
}
