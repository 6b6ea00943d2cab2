//! Observability for the tower layers: a shared [`Stats`] handle, `tracing` events per attempt,
//! and (with the `metrics` feature) counters through the `metrics` crate facade.
//!
//! Give the same [`StatsHandle`] to the layers of a stack and read it with
//! [`StatsHandle::snapshot`]; [`StatsHandle::diagnose`] says why throttling happened. Backends are
//! named by their configured names and no header value other than the `x-ratelimit-*` numbers is
//! kept, so nothing in a snapshot, an event or a metric carries a credential.
//!
//! With the `metrics` feature every attempt increments `tower_aoai_attempts_total` with labels
//! `backend` and `outcome` (`success`, `throttled_quota`, `throttled_capacity`, `blocked`, ...),
//! and records `tower_aoai_attempt_seconds` (time to response headers) as a histogram.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::policy::diagnose::{self, Diagnosis};
use crate::policy::headers;
use crate::policy::stats::{Attempt, Stats};

/// A [`Stats`] shared by the layers of a stack (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct StatsHandle {
    inner: Arc<Mutex<Stats>>,
}

impl StatsHandle {
    /// A new, empty handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the statistics as they are now.
    pub fn snapshot(&self) -> Stats {
        self.lock().clone()
    }

    /// The diagnosis of what was observed so far.
    pub fn diagnose(&self) -> Diagnosis {
        diagnose::diagnose(&self.lock())
    }

    /// Records one attempt: into the stats, as a `tracing` event, and as metrics if enabled.
    pub fn record(&self, attempt: Attempt<'_>) {
        emit(&attempt);
        self.lock().record(attempt);
    }

    /// Runs `f` on the statistics (to record blocks, hedge wins or gauges).
    pub fn with<R>(&self, f: impl FnOnce(&mut Stats) -> R) -> R {
        f(&mut self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Stats> {
        // Stats are plain counters: a panic elsewhere cannot leave them invalid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `tracing` event (and metrics) of one attempt.
pub(crate) fn emit(attempt: &Attempt<'_>) {
    let outcome = attempt.class.outcome.as_str();
    // The event's fields are looked up only when someone listens for it.
    if tracing::enabled!(target: "tower_aoai::attempt", tracing::Level::DEBUG) {
        let apim_request_id = attempt
            .headers
            .and_then(|h| h.get(headers::APIM_REQUEST_ID))
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 64);
        let region = attempt.region.or_else(|| {
            attempt
                .headers
                .and_then(|h| h.get(headers::MS_REGION))
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 64)
        });
        tracing::debug!(
            target: "tower_aoai::attempt",
            backend = attempt.backend,
            region,
            apim_request_id,
            outcome,
            retry = attempt.retry,
            hedge = attempt.hedge,
            latency_ms = attempt.latency.map(|l| l.as_secs_f64() * 1000.0),
            hint_ms = attempt.class.hint.map(|h| h.delay.as_millis() as u64),
            "attempt"
        );
    }
    #[cfg(feature = "metrics")]
    {
        metrics::counter!(
            "tower_aoai_attempts_total",
            "backend" => attempt.backend.to_owned(),
            "outcome" => outcome
        )
        .increment(1);
        if let Some(latency) = attempt.latency {
            metrics::histogram!(
                "tower_aoai_attempt_seconds",
                "backend" => attempt.backend.to_owned()
            )
            .record(latency.as_secs_f64());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime};

    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;
    use crate::policy::classify::classify_response;

    /// Everything a subscriber wrote.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// What was written, as text.
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }

        /// A subscriber that writes here what `filter` lets through, without colours.
        pub(crate) fn subscriber(&self, filter: &str) -> impl tracing::Subscriber + Send + Sync {
            let writer = self.clone();
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish()
        }

        /// Makes [`subscriber`](Self::subscriber) this thread's default until the guard drops.
        /// Tests run in parallel, and a callsite first hit on another thread while this
        /// subscriber was being set up can keep a cached "nobody listens" (tracing caches each
        /// callsite's interest); rebuilding the cache once ours is in place removes that race.
        pub(crate) fn set_default(&self, filter: &str) -> tracing::subscriber::DefaultGuard {
            let guard = tracing::subscriber::set_default(self.subscriber(filter));
            tracing::callsite::rebuild_interest_cache();
            guard
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(stats: &StatsHandle, headers: &HeaderMap) {
        let class = classify_response(StatusCode::OK, headers, None, SystemTime::now());
        stats.record(Attempt {
            backend: "east",
            region: None,
            class: &class,
            headers: Some(headers),
            latency: Some(Duration::from_millis(12)),
            retry: false,
            hedge: false,
            wall_now: SystemTime::now(),
        });
    }

    #[test]
    fn an_attempt_event_names_its_region_and_request_id_when_someone_listens() {
        let mut headers = HeaderMap::new();
        headers.insert(headers::MS_REGION, HeaderValue::from_static("eastus2"));
        headers.insert(headers::APIM_REQUEST_ID, HeaderValue::from_static("req-42"));
        let stats = StatsHandle::new();
        let out = Captured::default();
        {
            let _listening = out.set_default("tower_aoai::attempt=debug");
            record(&stats, &headers);
        }
        let text = out.text();
        assert!(text.contains("region=\"eastus2\""), "{text}");
        assert!(text.contains("apim_request_id=\"req-42\""), "{text}");
        assert!(text.contains("outcome=\"success\""), "{text}");

        // Nobody listening: nothing written, and the attempt is still counted.
        let quiet = Captured::default();
        {
            let _listening = quiet.set_default("tower_aoai::attempt=info");
            record(&stats, &headers);
        }
        assert!(quiet.text().is_empty());
        assert_eq!(
            stats.snapshot().backend("east").map(|b| b.requests),
            Some(2)
        );
    }
}
