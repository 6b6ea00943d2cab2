//! Properties of the adaptive concurrency limit: the limit is enforced and stays in bounds, one
//! throttling episode costs one cut, permits are conserved however calls end, and idle time never
//! turns into a burst.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use tower_aoai::policy::classify::{Outcome, ThrottleCause, TransientKind};
use tower_aoai::policy::{AdaptiveLimit, Adjustment, LimitConfig, Permit};

#[derive(Debug, Clone)]
enum Op {
    /// Try to start an attempt of this many tokens.
    Acquire(u64),
    /// End the live permit at this index (mod len) with an outcome.
    Complete(usize, Ending),
    /// Drop the live permit at this index (mod len): a cancelled future.
    Cancel(usize),
    /// Let time pass.
    Advance(Duration),
}

#[derive(Debug, Clone, Copy)]
enum Ending {
    Success,
    Throttle,
    Overloaded,
    ServerError,
}

impl Ending {
    fn outcome(self) -> Outcome {
        match self {
            Ending::Success => Outcome::Success,
            Ending::Throttle => Outcome::Throttled(ThrottleCause::Capacity),
            Ending::Overloaded => Outcome::Transient(TransientKind::Overloaded),
            Ending::ServerError => Outcome::Transient(TransientKind::ServerError),
        }
    }
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        6 => Just(Ending::Success),
        2 => Just(Ending::Throttle),
        1 => Just(Ending::Overloaded),
        1 => Just(Ending::ServerError),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..5000).prop_map(Op::Acquire),
        4 => (any::<usize>(), ending()).prop_map(|(i, e)| Op::Complete(i, e)),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (0u64..20_000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
    ]
}

fn config() -> impl Strategy<Value = LimitConfig> {
    (1u32..8, 0u32..16, 0u32..300, 0.1f64..0.95, 0.0f64..=1.0).prop_map(
        |(min, above_min, above_initial, decrease, utilisation)| {
            LimitConfig::new()
                .with_min(min)
                .with_initial(min + above_min)
                .with_max(min + above_min + above_initial)
                .with_decrease(decrease)
                .with_utilisation(utilisation)
        },
    )
}

fn in_bounds(l: &AdaptiveLimit) -> bool {
    let c = l.config();
    (c.min()..=c.max()).contains(&l.limit())
        && l.window() >= f64::from(c.min())
        && l.window() <= f64::from(c.max())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Under any sequence of acquires, outcomes, cancellations and idle time: a permit is never
    /// issued above the limit, the limit stays in [min, max], a throttle cuts only when its permit
    /// was issued after the latest cut (one cut per episode), and in-flight accounting matches the
    /// permits actually held; dropping every permit at the end returns the limit to empty.
    #[test]
    fn limit_invariants(cfg in config(), ops in proptest::collection::vec(op(), 1..300)) {
        let mut l = AdaptiveLimit::new(cfg).unwrap();
        let mut now = Instant::now();
        let mut live: Vec<Permit> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire(tokens) => {
                    let room = l.available(now);
                    match l.try_acquire(now, tokens) {
                        Some(p) => {
                            prop_assert!(room > 0);
                            prop_assert!(l.in_flight() <= l.limit(), "{} > {}", l.in_flight(), l.limit());
                            prop_assert_eq!(p.epoch(), l.epoch());
                            live.push(p);
                        }
                        None => prop_assert_eq!(room, 0),
                    }
                }
                Op::Complete(i, ending) if !live.is_empty() => {
                    let p = live.swap_remove(i % live.len());
                    let (permit_epoch, epoch_before, window_before) = (p.epoch(), l.epoch(), l.window());
                    let outcome = ending.outcome();
                    let adj = l.on_outcome(p, outcome, now);
                    match adj {
                        Adjustment::Cut { from, to } => {
                            prop_assert!(outcome.is_throttle());
                            prop_assert_eq!(permit_epoch, epoch_before, "a throttle from before the last cut cut again");
                            prop_assert_eq!(l.epoch(), epoch_before + 1);
                            prop_assert!(to <= from);
                        }
                        Adjustment::SameEpisode => {
                            prop_assert!(outcome.is_throttle());
                            prop_assert!(permit_epoch < epoch_before);
                            prop_assert_eq!(l.window(), window_before);
                        }
                        Adjustment::Tolerated => {
                            prop_assert!(outcome.is_throttle());
                            prop_assert_eq!(permit_epoch, epoch_before);
                            prop_assert_eq!(l.window(), window_before);
                            prop_assert_eq!(l.epoch(), epoch_before);
                        }
                        Adjustment::Grew { from, to } => {
                            prop_assert_eq!(outcome, Outcome::Success);
                            prop_assert!(to > from);
                            // Slow start adds at most one per success.
                            prop_assert!(to - from <= 1.0 + 1e-9);
                        }
                        Adjustment::Unchanged => {
                            prop_assert!(!outcome.is_throttle());
                            prop_assert_eq!(l.window(), window_before);
                        }
                        _ => prop_assert!(false, "unknown adjustment"),
                    }
                    if outcome.is_throttle() {
                        let answered = matches!(
                            adj,
                            Adjustment::Cut { .. } | Adjustment::SameEpisode | Adjustment::Tolerated
                        );
                        prop_assert!(answered, "a throttle neither cut nor was matched to its episode");
                    }
                }
                Op::Cancel(i) if !live.is_empty() => {
                    let window = l.window();
                    let p = live.swap_remove(i % live.len());
                    l.on_cancel(p, now);
                    prop_assert_eq!(l.window(), window, "a cancellation changed the limit");
                }
                Op::Advance(d) => now += d,
                _ => {}
            }
            prop_assert!(in_bounds(&l), "limit {} window {} out of bounds", l.limit(), l.window());
            prop_assert_eq!(l.in_flight() as usize, live.len());
            prop_assert_eq!(l.tokens_in_flight(), live.iter().map(Permit::tokens).sum::<u64>());
        }
        for p in live.drain(..) {
            l.on_cancel(p, now);
        }
        prop_assert_eq!(l.in_flight(), 0);
        prop_assert_eq!(l.tokens_in_flight(), 0);
        prop_assert_eq!(l.available(now), l.limit_at(now));
    }

    /// However high the limit climbed, after at least one idle period the next burst is at most
    /// half of it (or the initial limit), and after a long silence it is the initial limit.
    #[test]
    fn idle_never_becomes_a_burst(
        rounds in 1usize..10,
        idle_ms in 0u64..3_600_000,
        rtt_ms in 1u64..30_000,
    ) {
        let mut l = AdaptiveLimit::default();
        let initial = l.config().initial();
        let rtt = Duration::from_millis(rtt_ms);
        let mut now = Instant::now();
        for _ in 0..rounds {
            let mut permits = Vec::new();
            while let Some(p) = l.try_acquire(now, 1) {
                permits.push(p);
            }
            now += rtt;
            for p in permits {
                let _ = l.on_outcome(p, Outcome::Success, now);
            }
        }
        let before = l.limit();
        let period = l.idle_period();
        now += Duration::from_millis(idle_ms);
        let mut burst = 0u32;
        let mut permits = Vec::new();
        while let Some(p) = l.try_acquire(now, 1) {
            burst += 1;
            permits.push(p);
        }
        let idle = Duration::from_millis(idle_ms);
        if idle >= period {
            prop_assert!(burst <= ((f64::from(before) / 2.0).round() as u32).max(initial), "burst {burst} after idle, limit was {before}");
        } else {
            prop_assert_eq!(burst, before);
        }
        if idle >= period * 8 {
            prop_assert!(burst <= (before / 256).max(initial) || burst == initial);
        }
        for p in permits {
            l.on_cancel(p, now);
        }
    }
}
