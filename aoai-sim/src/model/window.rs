//! A sliding-window counter in virtual time.

use std::collections::VecDeque;
use std::time::Duration;

/// Slots per window: the window slides in steps of `width / SLOTS`.
const SLOTS: u64 = 100;

/// Sums amounts added over the last `width` of virtual time, in `SLOTS` steps.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    slot_nanos: u64,
    entries: VecDeque<(u64, u64)>,
    total: u64,
}

impl Window {
    pub(crate) fn new(width: Duration) -> Self {
        let nanos = u64::try_from(width.as_nanos())
            .unwrap_or(u64::MAX)
            .max(SLOTS);
        Self {
            slot_nanos: nanos / SLOTS,
            entries: VecDeque::new(),
            total: 0,
        }
    }

    fn slot(&self, now: Duration) -> u64 {
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX) / self.slot_nanos
    }

    fn expire(&mut self, now: Duration) {
        let current = self.slot(now);
        while let Some(&(slot, amount)) = self.entries.front() {
            if slot + SLOTS <= current {
                self.total -= amount;
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// The sum over the window ending at `now`.
    pub(crate) fn total(&mut self, now: Duration) -> u64 {
        self.expire(now);
        self.total
    }

    /// Adds `amount` at `now`.
    pub(crate) fn add(&mut self, now: Duration, amount: u64) {
        self.expire(now);
        let slot = self.slot(now);
        match self.entries.back_mut() {
            Some((s, a)) if *s == slot => *a += amount,
            _ => self.entries.push_back((slot, amount)),
        }
        self.total += amount;
    }

    /// How long until `extra` more fits under `limit` (zero if it fits now; the window's width
    /// when it can never fit).
    pub(crate) fn time_until_fits(&mut self, now: Duration, extra: u64, limit: u64) -> Duration {
        self.expire(now);
        if self.total.saturating_add(extra) <= limit {
            return Duration::ZERO;
        }
        let mut remaining = self.total;
        for &(slot, amount) in &self.entries {
            remaining -= amount;
            if remaining.saturating_add(extra) <= limit {
                let expires = Duration::from_nanos((slot + SLOTS) * self.slot_nanos);
                return expires.saturating_sub(now).max(Duration::from_millis(1));
            }
        }
        Duration::from_nanos(self.slot_nanos * SLOTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slides_and_predicts_when_room_frees_up() {
        let mut w = Window::new(Duration::from_secs(10));
        w.add(Duration::from_secs(0), 5);
        w.add(Duration::from_secs(4), 5);
        assert_eq!(w.total(Duration::from_secs(9)), 10);
        assert_eq!(
            w.time_until_fits(Duration::from_secs(9), 1, 10),
            Duration::from_secs(1)
        );
        assert_eq!(w.total(Duration::from_secs(10)), 5);
        assert_eq!(w.total(Duration::from_secs(14)), 0);
    }
}
