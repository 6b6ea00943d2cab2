//! With the `metrics` feature, every recorded attempt is a counter increment (labels: backend and
//! outcome) and a latency sample.
#![cfg(feature = "metrics")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tower_aoai::observe::StatsHandle;
use tower_aoai::policy::classify::classify_response;
use tower_aoai::policy::stats::Attempt;

/// Counts per metric key (name and sorted labels).
#[derive(Default)]
struct Recorded(Mutex<BTreeMap<String, f64>>);

struct Slot(Arc<Recorded>, String);

impl CounterFn for Slot {
    fn increment(&self, value: u64) {
        *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += value as f64;
    }
    fn absolute(&self, value: u64) {
        self.0
            .0
            .lock()
            .unwrap()
            .insert(self.1.clone(), value as f64);
    }
}

impl HistogramFn for Slot {
    fn record(&self, _value: f64) {
        *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += 1.0;
    }
}

struct TestRecorder(Arc<Recorded>);

fn name(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Slot(self.0.clone(), name(key))))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(Slot(self.0.clone(), name(key))))
    }
}

#[test]
fn attempts_are_counted_by_backend_and_outcome() {
    let recorded = Arc::new(Recorded::default());
    let recorder = TestRecorder(recorded.clone());
    let stats = StatsHandle::new();
    let peak =
        br#"{"error":{"code":"429","message":"The system is currently experiencing high demand"}}"#;
    metrics::with_local_recorder(&recorder, || {
        for (status, body) in [(429, &peak[..]), (429, &peak[..]), (200, &b""[..])] {
            let class = classify_response(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                Some(body),
                SystemTime::now(),
            );
            stats.record(Attempt {
                backend: "east",
                region: None,
                class: &class,
                headers: None,
                latency: Some(Duration::from_millis(20)),
                retry: false,
                hedge: false,
                wall_now: SystemTime::now(),
            });
        }
    });
    let got = recorded.0.lock().unwrap().clone();
    assert_eq!(
        got.get("tower_aoai_attempts_total{backend=east,outcome=throttled_capacity}"),
        Some(&2.0),
        "{got:?}"
    );
    assert_eq!(
        got.get("tower_aoai_attempts_total{backend=east,outcome=success}"),
        Some(&1.0),
        "{got:?}"
    );
    assert_eq!(
        got.get("tower_aoai_attempt_seconds{backend=east}"),
        Some(&3.0),
        "{got:?}"
    );
}
