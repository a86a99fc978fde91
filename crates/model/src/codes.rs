//! Error codes a Decide request can fail with (REFERENCE.md §3, §4). They are part of
//! the wire contract: callers match on the string, so the spelling never changes.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    PolicyNotFound,
    DecisionFailed,
    ExtensionTimeout,
    ValidatorBlocked,
    PreProcessorFailed,
    PostProcessorFailed,
    ExtensionUnavailable,
    ExtensionNotFound,
    DeadlineExceeded,
    ExtensionError,
    InvalidResponseFormat,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidRequest,
        ErrorCode::PolicyNotFound,
        ErrorCode::DecisionFailed,
        ErrorCode::ExtensionTimeout,
        ErrorCode::ValidatorBlocked,
        ErrorCode::PreProcessorFailed,
        ErrorCode::PostProcessorFailed,
        ErrorCode::ExtensionUnavailable,
        ErrorCode::ExtensionNotFound,
        ErrorCode::DeadlineExceeded,
        ErrorCode::ExtensionError,
        ErrorCode::InvalidResponseFormat,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PolicyNotFound => "policy_not_found",
            ErrorCode::DecisionFailed => "decision_failed",
            ErrorCode::ExtensionTimeout => "extension_timeout",
            ErrorCode::ValidatorBlocked => "validator_blocked",
            ErrorCode::PreProcessorFailed => "pre_processor_failed",
            ErrorCode::PostProcessorFailed => "post_processor_failed",
            ErrorCode::ExtensionUnavailable => "extension_unavailable",
            ErrorCode::ExtensionNotFound => "extension_not_found",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::ExtensionError => "extension_error",
            ErrorCode::InvalidResponseFormat => "invalid_response_format",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_string() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }
}
