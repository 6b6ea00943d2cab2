//! Properties of the GCRA pacer: whatever the arrivals, estimates, learned limits and server holds,
//! the emitted schedule never exceeds the paced rate over any 1 s or 60 s window.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use tower_aoai::policy::{LimitWindow, Pacer, PacingConfig};

#[derive(Debug, Clone)]
struct Arrival {
    gap: Duration,
    tokens: u64,
    /// A server hold seen at this arrival, if any.
    hold: Option<Duration>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        0u64..3_000,
        1u64..20_000,
        proptest::option::weighted(0.05, 1u64..30_000),
    )
        .prop_map(|(gap, tokens, hold)| Arrival {
            gap: Duration::from_millis(gap),
            tokens,
            hold: hold.map(Duration::from_millis),
        })
}

/// Runs arrivals through the pacer, first come first served, and returns (send time, tokens).
fn schedule(p: &mut Pacer, arrivals: &[Arrival]) -> Vec<(Instant, u64)> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut arrive = t0;
    let mut sent = Vec::new();
    for a in arrivals {
        arrive += a.gap;
        now = now.max(arrive);
        if let Some(hold) = a.hold {
            p.hold(now, hold);
        }
        let mut asks = 0;
        loop {
            match p.check(now, a.tokens) {
                Ok(()) => break,
                Err(wait) => {
                    assert!(!wait.is_zero(), "a refusal must say how long to wait");
                    assert!(wait <= p.config().max_hold(), "a wait above max_hold");
                    now += wait;
                    asks += 1;
                    assert!(asks < 10_000, "the pacer never let a request go");
                }
            }
        }
        sent.push((now, a.tokens));
    }
    sent
}

/// The rates a pacer promises, computed from its settings (not read back from the pacer).
#[derive(Debug, Clone, Copy)]
struct Promise {
    /// Requests per second and burst, when paced.
    requests: Option<(f64, u32)>,
    /// Tokens per second and token burst, when paced.
    tokens: Option<(f64, u64)>,
}

impl Promise {
    fn new(rpm: Option<f64>, tpm: Option<f64>, burst: u32, token_burst: u64, safety: f64) -> Self {
        Self {
            requests: rpm.map(|r| (r / 60.0 * safety, burst)),
            tokens: tpm.map(|t| (t / 60.0 * safety, token_burst)),
        }
    }
}

/// For every window [t_i, t_i + w): (n - 1) requests fit in w plus the burst tolerance at the
/// promised rate, and so do the tokens of all but the last request (each charged at most a
/// minute's quota).
fn check_windows(
    promise: Promise,
    sent: &[(Instant, u64)],
    w: Duration,
) -> Result<(), TestCaseError> {
    // A nanosecond per send of rounding slack (the pacer rounds intervals up, never down).
    let slack = |n: usize| 1e-9 * n as f64;
    for (i, &(start, _)) in sent.iter().enumerate() {
        let inside: Vec<_> = sent[i..]
            .iter()
            .take_while(|(t, _)| *t < start + w)
            .collect();
        let n = inside.len();
        if let Some((rate, burst)) = promise.requests {
            let allowed = w.as_secs_f64() * rate + f64::from(burst - 1);
            prop_assert!(
                ((n - 1) as f64) < allowed + slack(n) || n == 1,
                "{n} requests in {w:?} at {rate}/s with burst {burst}"
            );
        }
        if let Some((rate, burst)) = promise.tokens {
            let cap = rate * 60.0;
            let before_last: f64 = inside[..n - 1]
                .iter()
                .map(|(_, c)| (*c as f64).min(cap))
                .sum();
            let allowed = w.as_secs_f64() * rate + burst as f64;
            prop_assert!(
                before_last <= allowed * (1.0 + 1e-9) + 1e-6,
                "{before_last} tokens (before the last) in {w:?}, allowed {allowed}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Configured rates: no 1 s or 60 s window of the schedule exceeds them.
    #[test]
    fn configured_rates_hold_over_every_window(
        rpm in proptest::option::of(1.0f64..6000.0),
        tpm in proptest::option::of(1000.0f64..2_000_000.0),
        request_burst in 1u32..4,
        token_burst in 0u64..5_000,
        safety in 0.5f64..=1.0,
        arrivals in proptest::collection::vec(arrival(), 1..250),
    ) {
        let cfg = PacingConfig::new()
            .with_requests_per_minute(rpm)
            .with_tokens_per_minute(tpm)
            .with_request_burst(request_burst)
            .with_token_burst(token_burst)
            .with_safety(safety);
        let mut p = Pacer::new(cfg).unwrap();
        let sent = schedule(&mut p, &arrivals);
        prop_assert_eq!(sent.len(), arrivals.len());
        let promise = Promise::new(rpm, tpm, request_burst, token_burst, safety);
        for w in [Duration::from_secs(1), Duration::from_secs(60)] {
            check_windows(promise, &sent, w)?;
        }
        // With one request of burst, the 1 s bound is the quota's own per-second share.
        if let (Some(rpm), 1) = (rpm, request_burst) {
            let per_second = (rpm * safety / 60.0).max(1.0).ceil() as usize;
            for (i, &(start, _)) in sent.iter().enumerate() {
                let n = sent[i..].iter().take_while(|(t, _)| *t < start + Duration::from_secs(1)).count();
                prop_assert!(n <= per_second, "{n} in 1 s at {rpm} rpm x {safety}");
            }
        }
    }

    /// Learned rates: a response's `x-ratelimit-limit-*` headers set the pace of what follows.
    #[test]
    fn learned_rates_hold_over_every_window(
        rpm in 1u64..6000,
        tpm in 1000u64..2_000_000,
        arrivals in proptest::collection::vec(arrival(), 1..200),
    ) {
        let mut p = Pacer::new(PacingConfig::new().with_limit_window(LimitWindow::Minute)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-limit-requests", HeaderValue::from(rpm));
        headers.insert("x-ratelimit-limit-tokens", HeaderValue::from(tpm));
        let t0 = Instant::now();
        p.on_response_to(t0, t0, &headers);
        prop_assert_eq!(p.requests_per_minute(), Some(rpm as f64));
        let sent = schedule(&mut p, &arrivals);
        let safety = p.config().safety();
        let promise = Promise::new(Some(rpm as f64), Some(tpm as f64), 1, 0, safety);
        for w in [Duration::from_secs(1), Duration::from_secs(60)] {
            check_windows(promise, &sent, w)?;
        }
    }
}
