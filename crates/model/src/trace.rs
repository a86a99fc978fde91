//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and
//! `tracestate` headers a caller may send with a Decide and the router writes into
//! every extension request, read and written without allocating; and the process-wide
//! switch that says whether the router makes spans at all.
//!
//! The switch is off unless `[tracing] endpoint` is configured (the binary turns it on
//! once its exporter is installed). Off, no span is created anywhere; a caller's
//! `traceparent` is still passed through to extensions as it came.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The W3C header that carries trace id, parent span id and flags.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The W3C header of vendor-specific trace state, passed through unchanged.
pub const HEADER_TRACESTATE: &str = "tracestate";
/// Longest `tracestate` passed on (W3C: 32 members of at most 256 characters, and
/// an implementation may drop the header when it is longer than 512).
pub const MAX_TRACESTATE_LEN: usize = 512;

/// The `sampled` bit of the trace flags.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: `00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// Never zero.
    pub trace_id: u128,
    /// The caller's span: the parent of ours. Never zero.
    pub parent_id: u64,
    pub flags: u8,
}

/// Length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;

impl TraceParent {
    /// Reads a `traceparent` value as W3C Trace Context level 1 says: lowercase hex,
    /// version `ff` invalid, all-zero ids invalid, a version-00 value exactly 55
    /// characters, a later version at least that and followed by `-` when longer.
    /// Surrounding spaces and tabs are allowed. `None` when it is not valid (the
    /// request then starts a new trace).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim_matches([' ', '\t']).as_bytes();
        if v.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_lower(&v[0..2])? as u8;
        if version == 0xff || (version == 0 && v.len() != TRACEPARENT_LEN) {
            return None;
        }
        if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' {
            return None;
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let trace_id = hex_lower(&v[3..35])?;
        let parent_id = hex_lower(&v[36..52])? as u64;
        let flags = hex_lower(&v[53..55])? as u8;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// The version-00 header value.
    pub fn encode(&self) -> TraceParentText {
        let mut b = [0u8; TRACEPARENT_LEN];
        b[0] = b'0';
        b[1] = b'0';
        b[2] = b'-';
        write_hex(&mut b[3..35], self.trace_id);
        b[35] = b'-';
        write_hex(&mut b[36..52], u128::from(self.parent_id));
        b[52] = b'-';
        write_hex(&mut b[53..55], u128::from(self.flags));
        TraceParentText(b)
    }

    /// The trace id as a request's `trace_id` (32 lowercase hex digits).
    pub fn trace_id_hex(&self) -> String {
        trace_id_hex(self.trace_id)
    }
}

/// A `traceparent` value on the stack.
#[derive(Clone, Copy)]
pub struct TraceParentText([u8; TRACEPARENT_LEN]);

impl TraceParentText {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for TraceParentText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TraceParentText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request `trace_id` read as a W3C trace id: 32 lowercase hex digits, not all
/// zero. A router-made id always is one; a caller's may not be (then its trace gets
/// a new OpenTelemetry id and keeps its own as the `trace_id` attribute).
pub fn parse_trace_id(s: &str) -> Option<u128> {
    if s.len() != 32 {
        return None;
    }
    hex_lower(s.as_bytes()).filter(|&id| id != 0)
}

/// 32 lowercase hex digits.
pub fn trace_id_hex(id: u128) -> String {
    let mut b = [0u8; 32];
    write_hex(&mut b, id);
    String::from_utf8_lossy(&b).into_owned()
}

/// 16 lowercase hex digits.
pub fn span_id_hex(id: u64) -> String {
    let mut b = [0u8; 16];
    write_hex(&mut b, u128::from(id));
    String::from_utf8_lossy(&b).into_owned()
}

/// A `tracestate` value worth passing on: printable ASCII, bounded.
pub fn usable_tracestate(value: &str) -> Option<&str> {
    let v = value.trim_matches([' ', '\t']);
    (!v.is_empty()
        && v.len() <= MAX_TRACESTATE_LEN
        && v.bytes().all(|b| (0x20..=0x7e).contains(&b)))
    .then_some(v)
}

fn hex_lower(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    let mut n: u128 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(v);
    }
    Some(n)
}

fn write_hex(out: &mut [u8], mut n: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

static SPANS: AtomicBool = AtomicBool::new(false);

/// Whether spans are made (an exporter is installed). One relaxed load: what the
/// hot path pays with tracing off.
#[inline]
pub fn spans_enabled() -> bool {
    SPANS.load(Ordering::Relaxed)
}

/// Turns span making on or off for the whole process (the binary, once its exporter
/// is installed; tests).
pub fn set_spans_enabled(on: bool) {
    SPANS.store(on, Ordering::Relaxed);
}

/// `[tracing] sample_ratio`, as the bits of an f64.
static SAMPLE_RATIO: AtomicU64 = AtomicU64::new(1.0f64.to_bits());

/// The share of new traces kept (`[tracing] sample_ratio`).
pub fn sample_ratio() -> f64 {
    f64::from_bits(SAMPLE_RATIO.load(Ordering::Relaxed))
}

/// Sets [`sample_ratio`] for the whole process (the binary, with its exporter).
pub fn set_sample_ratio(ratio: f64) {
    SAMPLE_RATIO.store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
}

/// Whether a new trace with `trace_id` is kept at `ratio`: OpenTelemetry's
/// `TraceIdRatioBased` decision (the trace id's low 63 bits against the ratio), so
/// every service that samples by ratio keeps the same traces.
pub fn ratio_samples(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_sampling_is_otels_decision_on_the_trace_id() {
        let low = |n: u64| (0xabcdu128 << 64) | u128::from(n);
        assert!(ratio_samples(low(u64::MAX), 1.0));
        assert!(!ratio_samples(low(0), 0.0));
        // Half: the low 64 bits shifted right once below 2^62.
        assert!(ratio_samples(low((1u64 << 63) - 2), 0.5));
        assert!(!ratio_samples(low(1u64 << 63), 0.5));
        // About the ratio over many ids.
        let kept = (0..10_000u64)
            .filter(|i| ratio_samples(low(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)), 0.1))
            .count();
        assert!((800..1200).contains(&kept), "{kept}");
    }

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(tp.parent_id, 0x00f067aa0ba902b7);
        assert!(tp.sampled());
        assert_eq!(tp.encode().as_str(), GOOD);
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            TraceParent::parse(&format!(" \t{GOOD} ")),
            Some(tp),
            "optional whitespace around the value"
        );
    }

    #[test]
    fn flags_are_kept_and_only_bit_0_means_sampled() {
        let unsampled =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());
        let other =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02").unwrap();
        assert!(!other.sampled());
        assert_eq!(other.flags, 2);
        assert!(other.encode().as_str().ends_with("-02"));
        let both =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
        assert!(both.sampled());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero trace id / parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // version 00 with extra fields
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // wrong separators, short fields, non-hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // a later version must be followed by '-' when longer
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // non-ASCII
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?} must be refused");
        }
    }

    #[test]
    fn a_later_version_is_read_as_version_00() {
        let tp = TraceParent::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
        )
        .unwrap();
        assert_eq!(tp.encode().as_str(), GOOD);
    }

    #[test]
    fn trace_ids_in_w3c_form_are_recognised() {
        assert_eq!(
            parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"),
            Some(0x4bf92f3577b34da6a3ce929d0e0e4736)
        );
        assert_eq!(parse_trace_id("abc"), None);
        assert_eq!(parse_trace_id("00000000000000000000000000000000"), None);
        assert_eq!(parse_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736"), None);
        assert_eq!(trace_id_hex(1), "00000000000000000000000000000001");
        assert_eq!(span_id_hex(0xab), "00000000000000ab");
    }

    #[test]
    fn tracestate_is_bounded_and_printable() {
        assert_eq!(
            usable_tracestate(" rojo=00f067aa0ba902b7 "),
            Some("rojo=00f067aa0ba902b7")
        );
        assert_eq!(usable_tracestate(""), None);
        assert_eq!(usable_tracestate("a=\u{7}"), None);
        assert_eq!(usable_tracestate(&"a".repeat(MAX_TRACESTATE_LEN + 1)), None);
    }
}
