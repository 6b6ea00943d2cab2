//! Properties of the retry core: hint parsers, classification, backoff, budget, retry decisions.

use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_aoai::policy::classify::{self, Classification, Outcome, ThrottleCause};
use tower_aoai::policy::hints::{self, MAX_HINT};
use tower_aoai::policy::{Action, Backoff, DelayHint, HintSource, RetryBudget, RetryPolicy};

const HINT_HEADERS: [&str; 6] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-rate-limit-reset-tokens",
    "x-should-retry",
];

fn wall_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic a parser, and whatever they yield is a positive, bounded delay.
    #[test]
    fn parsers_never_panic_and_stay_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        for d in [
            hints::parse_retry_after_ms(&bytes),
            hints::parse_retry_after(&bytes, wall_now()),
            hints::parse_reset(&bytes),
        ]
        .into_iter()
        .flatten()
        {
            prop_assert!(!d.is_zero());
            prop_assert!(d <= MAX_HINT);
        }
    }

    /// Text that looks like the real thing (digits, units, dates' characters) never panics either.
    #[test]
    fn plausible_text_never_panics(text in "[-0-9.hms µnu, A-Za-z:]{0,40}") {
        let _ = hints::parse_retry_after_ms(text.as_bytes());
        let _ = hints::parse_retry_after(text.as_bytes(), wall_now());
        let _ = hints::parse_reset(text.as_bytes());
    }

    /// Whole responses with hostile headers and bodies classify without panicking, and only
    /// failures carry a hint.
    #[test]
    fn classification_never_panics(
        status in 100u16..1000,
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 6),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in HINT_HEADERS.iter().zip(&values) {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
        let status = StatusCode::from_u16(status).unwrap();
        let class = classify::classify_response(status, &headers, Some(&body), wall_now());
        if status.is_success() {
            prop_assert_eq!(class.outcome, Outcome::Success);
            prop_assert!(class.hint.is_none());
        }
        if let Some(h) = class.hint {
            prop_assert!(h.delay <= MAX_HINT && !h.delay.is_zero());
        }
    }

    /// A delay never exceeds the backoff cap (no hint) nor hint * (1 + jitter) (with a hint).
    #[test]
    fn backoff_delay_is_bounded(
        retry in 0u32..200,
        hint_ms in proptest::option::of(1u64..10_000_000),
        jitter in 0.0f64..=1.0,
        seed in any::<u64>(),
    ) {
        let backoff = Backoff::default().with_hint_jitter(jitter).unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        let hint = hint_ms.map(Duration::from_millis);
        let d = backoff.delay(retry, hint, &mut rng);
        match hint {
            None => prop_assert!(d <= backoff.cap()),
            Some(h) => {
                prop_assert!(d >= h);
                prop_assert!(d <= h.mul_f64(1.0 + jitter) + Duration::from_nanos(1));
            }
        }
    }

    /// Whatever happens, a retry never waits past `max_wait` nor past the deadline, and a call
    /// never makes more than `max_attempts` attempts.
    #[test]
    fn retry_waits_respect_cap_and_deadline(
        max_attempts in 1u32..10,
        deadline_ms in 1u64..200_000,
        max_wait_ms in 1u64..100_000,
        steps in proptest::collection::vec((proptest::option::of(1u64..300_000), 0u64..5_000), 1..15),
        seed in any::<u64>(),
    ) {
        let policy = RetryPolicy::new()
            .with_max_attempts(max_attempts).unwrap()
            .with_deadline(Some(Duration::from_millis(deadline_ms))).unwrap()
            .with_max_wait(Duration::from_millis(max_wait_ms)).unwrap();
        let mut budget = RetryBudget::unlimited();
        let mut rng = fastrand::Rng::with_seed(seed);
        let t0 = Instant::now();
        let mut now = t0;
        let mut call = policy.start(now, None, &mut budget);
        let deadline = t0 + Duration::from_millis(deadline_ms);
        let mut attempts = 0;
        for (hint_ms, attempt_ms) in steps {
            now += Duration::from_millis(attempt_ms);
            attempts += 1;
            let class = Classification {
                outcome: Outcome::Throttled(ThrottleCause::Unknown),
                retryable: true,
                hint: hint_ms.map(|ms| DelayHint { delay: Duration::from_millis(ms), source: HintSource::RetryAfterMs }),
            };
            match policy.on_attempt(&mut call, &class, now, &mut budget, &mut rng) {
                Action::Retry { after, .. } => {
                    prop_assert!(after <= Duration::from_millis(max_wait_ms));
                    prop_assert!(now + after <= deadline);
                    if let Some(ms) = hint_ms {
                        prop_assert!(after >= Duration::from_millis(ms), "retried before the server's hint");
                    }
                    now += after;
                }
                _ => break,
            }
        }
        prop_assert!(attempts <= max_attempts);
    }

    /// Over any window, withdrawals never exceed reserve + ratio * deposits of that window.
    #[test]
    fn budget_never_allows_more_than_its_share(
        events in proptest::collection::vec((0u64..3_000, any::<bool>()), 1..400),
        min_per_sec in 0u32..5,
        ratio in 0.0f64..1.0,
    ) {
        let ttl = Duration::from_secs(10);
        let mut budget = RetryBudget::new(ttl, min_per_sec, ratio).unwrap();
        let t0 = Instant::now();
        let mut now = t0;
        let mut log: Vec<(Duration, bool, bool)> = Vec::new(); // (time, is_deposit, granted)
        for (gap_ms, is_deposit) in events {
            now += Duration::from_millis(gap_ms);
            if is_deposit {
                budget.deposit(now);
                log.push((now - t0, true, true));
            } else {
                let granted = budget.try_withdraw(now);
                log.push((now - t0, false, granted));
            }
        }
        // The budget counts in ten slots of ttl/10 from its first event: at each granted retry,
        // the ten slots ending with the current one hold at most reserve + ratio * deposits.
        let reserve = f64::from(min_per_sec) * ttl.as_secs_f64();
        let origin = log[0].0;
        let slot = ttl / 10;
        for (i, &(t, is_deposit, granted)) in log.iter().enumerate() {
            if is_deposit || !granted {
                continue;
            }
            let current = ((t - origin).as_nanos() / slot.as_nanos()) as u64;
            let first = current.saturating_sub(9);
            let in_window = |at: Duration| ((at - origin).as_nanos() / slot.as_nanos()) as u64 >= first;
            let (mut deposits, mut withdrawals) = (0.0, 0.0);
            for &(at, d, g) in &log[..=i] {
                if !in_window(at) { continue; }
                if d { deposits += 1.0 } else if g { withdrawals += 1.0 }
            }
            prop_assert!(withdrawals <= reserve + ratio * deposits + 1e-9,
                "{withdrawals} retries > {reserve} + {ratio} * {deposits}");
        }
    }
}
