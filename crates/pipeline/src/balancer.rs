//! Smooth weighted round robin (the nginx algorithm): every pick adds each candidate's
//! weight to its running score, takes the highest, and subtracts the total from it.
//! Over any `sum(weights)` consecutive picks of an unchanged set, each candidate is
//! picked exactly `weight` times, spread out rather than in runs — unlike the
//! original's hash of (id, current second), which sent a whole second to one instance.
//!
//! Scores are kept per candidate name, so a candidate that drops out (unhealthy,
//! breaker open) and comes back keeps its place.

use std::collections::HashMap;
use std::sync::Mutex;

/// Round-robin state for one set of candidates (an extension's instances, or a
/// policy's providers).
#[derive(Debug, Default)]
pub struct SmoothWrr {
    scores: Mutex<HashMap<String, i64>>,
}

impl SmoothWrr {
    pub fn new() -> SmoothWrr {
        SmoothWrr::default()
    }

    /// Picks the index of one of `candidates` (name, weight); `None` when no candidate
    /// has a positive weight.
    pub fn pick<'a>(
        &self,
        candidates: impl Iterator<Item = (&'a str, u32)> + Clone,
    ) -> Option<usize> {
        let total: i64 = candidates.clone().map(|(_, w)| i64::from(w)).sum();
        if total <= 0 {
            return None;
        }
        let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<(usize, &'a str, i64)> = None;
        for (i, (name, weight)) in candidates.enumerate() {
            if weight == 0 {
                continue;
            }
            let score = scores.entry(name.to_string()).or_insert(0);
            *score += i64::from(weight);
            if best.is_none_or(|(_, _, s)| *score > s) {
                best = Some((i, name, *score));
            }
        }
        let (index, name, _) = best?;
        if let Some(s) = scores.get_mut(name) {
            *s -= total;
        }
        // Forget candidates that left long ago so the map cannot grow without bound.
        if scores.len() > 4 * 1024 {
            scores.clear();
        }
        Some(index)
    }

    /// The index `pick` would return now, without taking the turn: a dry run shows
    /// what live traffic would get and leaves its distribution alone.
    pub fn peek<'a>(&self, candidates: impl Iterator<Item = (&'a str, u32)>) -> Option<usize> {
        let scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<(usize, i64)> = None;
        for (i, (name, weight)) in candidates.enumerate() {
            if weight == 0 {
                continue;
            }
            let score = scores.get(name).copied().unwrap_or(0) + i64::from(weight);
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(w: &SmoothWrr, set: &[(&str, u32)], n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let i = w.pick(set.iter().map(|(n, w)| (*n, *w))).unwrap();
            *counts.entry(set[i].0.to_string()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn peek_tells_the_next_pick_and_changes_nothing() {
        let w = SmoothWrr::new();
        let set = [("a", 2), ("b", 1)];
        let it = || set.iter().map(|(n, w)| (*n, *w));
        for _ in 0..7 {
            let peeked = w.peek(it());
            assert_eq!(w.peek(it()), peeked, "peeking twice gives the same");
            assert_eq!(w.pick(it()), peeked);
        }
        assert_eq!(w.peek(std::iter::empty()), None);
    }

    #[test]
    fn exact_over_every_window_of_sum_weights() {
        let w = SmoothWrr::new();
        let set = [("a", 75), ("b", 25)];
        for _ in 0..5 {
            let c = run(&w, &set, 100);
            assert_eq!((c["a"], c["b"]), (75, 25));
        }
        let set = [("x", 5), ("y", 1), ("z", 1)];
        let w = SmoothWrr::new();
        let c = run(&w, &set, 7);
        assert_eq!((c["x"], c["y"], c["z"]), (5, 1, 1));
    }

    #[test]
    fn picks_are_interleaved_not_bursty() {
        let w = SmoothWrr::new();
        let set = [("a", 50), ("b", 50)];
        let picks: Vec<usize> = (0..10)
            .map(|_| w.pick(set.iter().map(|(n, w)| (*n, *w))).unwrap())
            .collect();
        assert!(picks.windows(2).all(|p| p[0] != p[1]), "{picks:?}");
    }

    #[test]
    fn zero_weights_are_never_picked_and_all_zero_is_none() {
        let w = SmoothWrr::new();
        let c = run(&w, &[("a", 0), ("b", 10)], 20);
        assert_eq!(c.get("a"), None);
        assert_eq!(w.pick([("a", 0u32)].iter().map(|(n, w)| (*n, *w))), None);
        assert_eq!(w.pick(std::iter::empty::<(&str, u32)>()), None);
    }
}
