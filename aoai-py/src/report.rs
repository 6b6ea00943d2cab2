//! Statistics and diagnosis as plain Python values: dicts of numbers and strings, times as epoch
//! seconds. Nothing here can hold a secret: the core's `Stats` and `SupportRecord` keep none.

use std::time::{Duration, SystemTime};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tower_aoai::policy::diagnose;
use tower_aoai::policy::route::SupportRecord;
use tower_aoai::policy::stats::{BackendStats, Headroom, Stats};

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

fn headroom_dict<'py>(py: Python<'py>, h: &Headroom) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("remaining_requests", h.remaining_requests)?;
    d.set_item("remaining_tokens", h.remaining_tokens)?;
    d.set_item("limit_requests", h.limit_requests)?;
    d.set_item("limit_tokens", h.limit_tokens)?;
    d.set_item("seen_at", h.seen_at.map(epoch))?;
    Ok(d)
}

fn backend_dict<'py>(py: Python<'py>, b: &BackendStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("region", b.region.as_deref())?;
    d.set_item("requests", b.requests)?;
    d.set_item("successes", b.successes)?;
    d.set_item("retries", b.retries)?;
    d.set_item("hedges", b.hedges)?;
    d.set_item("hedge_wins", b.hedge_wins)?;
    let throttled = PyDict::new(py);
    throttled.set_item("quota", b.throttled.quota)?;
    throttled.set_item("capacity", b.throttled.capacity)?;
    throttled.set_item("provisioned", b.throttled.provisioned)?;
    throttled.set_item("unknown", b.throttled.unknown)?;
    throttled.set_item("total", b.throttled.total())?;
    d.set_item("throttled", throttled)?;
    d.set_item("blocked", b.blocked)?;
    d.set_item("server_errors", b.server_errors)?;
    d.set_item("connect_errors", b.connect_errors)?;
    d.set_item("timeouts", b.timeouts)?;
    d.set_item("client_errors", b.client_errors)?;
    d.set_item("headroom", headroom_dict(py, &b.headroom)?)?;
    d.set_item(
        "headroom_before_throttle",
        b.headroom_before_throttle
            .as_ref()
            .map(|h| headroom_dict(py, h))
            .transpose()?,
    )?;
    d.set_item("last_throttle_at", b.last_throttle_at.map(epoch))?;
    let latency = PyDict::new(py);
    latency.set_item("count", b.latency.count())?;
    for (name, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
        latency.set_item(name, b.latency.quantile(q).map(|d| d.as_secs_f64()))?;
    }
    d.set_item("latency", latency)?;
    let g = &b.gauges;
    let gauges = PyDict::new(py);
    gauges.set_item("limit", g.limit)?;
    gauges.set_item("in_flight", g.in_flight)?;
    gauges.set_item("queue_depth", g.queue_depth)?;
    gauges.set_item("cooldown_until", g.cooldown_until.map(epoch))?;
    gauges.set_item("breaker", g.breaker)?;
    gauges.set_item("breaker_until", g.breaker_until.map(epoch))?;
    d.set_item("gauges", gauges)?;
    Ok(d)
}

/// A 403 support record as a dict (time as epoch seconds, headers as `[name, value]` pairs).
pub(crate) fn record_dict<'py>(py: Python<'py>, r: &SupportRecord) -> PyResult<Bound<'py, PyAny>> {
    let d = PyDict::new(py);
    d.set_item("backend", &r.backend)?;
    d.set_item("resource", &r.resource)?;
    d.set_item("deployment", r.deployment.as_deref())?;
    d.set_item("region", r.region.as_deref())?;
    d.set_item("ms_region", r.ms_region.as_deref())?;
    d.set_item("apim_request_id", r.apim_request_id.as_deref())?;
    d.set_item("request_id", r.request_id.as_deref())?;
    d.set_item("time", epoch(r.time))?;
    d.set_item("status", r.status)?;
    let headers = PyList::empty(py);
    for (k, v) in &r.headers {
        headers.append((k, v))?;
    }
    d.set_item("headers", headers)?;
    d.set_item("body", &r.body)?;
    Ok(d.into_any())
}

/// `{"backends": {name: {...}}, "blocks": [record, ...]}`.
pub(crate) fn stats_dict<'py>(py: Python<'py>, stats: &Stats) -> PyResult<Bound<'py, PyAny>> {
    let backends = PyDict::new(py);
    for (name, b) in stats.backends() {
        backends.set_item(name, backend_dict(py, b)?)?;
    }
    let blocks = PyList::empty(py);
    for r in stats.blocks() {
        blocks.append(record_dict(py, r)?)?;
    }
    let d = PyDict::new(py);
    d.set_item("backends", backends)?;
    d.set_item("blocks", blocks)?;
    Ok(d.into_any())
}

/// Why throttling happened, from what the client saw: `.text` to read, `.to_dict()` to process.
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Diagnosis {
    diagnosis: diagnose::Diagnosis,
}

impl Diagnosis {
    pub(crate) fn new(diagnosis: diagnose::Diagnosis) -> Self {
        Self { diagnosis }
    }
}

#[pymethods]
impl Diagnosis {
    /// The report as text: one paragraph per finding, with its figures and advice.
    #[getter]
    fn text(&self) -> String {
        self.diagnosis.to_string()
    }

    /// The finding kinds, most important first (`"blocked"`, `"region"`, `"capacity"`, `"quota"`,
    /// `"provisioned"`, `"unclear"`).
    #[getter]
    fn kinds(&self) -> Vec<&'static str> {
        self.diagnosis
            .findings
            .iter()
            .map(|f| f.kind.as_str())
            .collect()
    }

    /// `{"findings": [{kind, backend, region, summary, evidence, advice, support_record}]}`;
    /// `evidence` maps each figure's name to its value, `support_record` is a dict for blocks.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let findings = PyList::empty(py);
        for f in &self.diagnosis.findings {
            let d = PyDict::new(py);
            d.set_item("kind", f.kind.as_str())?;
            d.set_item("backend", f.backend.as_deref())?;
            d.set_item("region", f.region.as_deref())?;
            d.set_item("summary", &f.summary)?;
            let evidence = PyDict::new(py);
            for (k, v) in &f.evidence {
                evidence.set_item(k, v)?;
            }
            d.set_item("evidence", evidence)?;
            d.set_item("advice", &f.advice)?;
            d.set_item(
                "support_record",
                f.support_record
                    .as_ref()
                    .map(|r| record_dict(py, r))
                    .transpose()?,
            )?;
            findings.append(d)?;
        }
        let d = PyDict::new(py);
        d.set_item("findings", findings)?;
        Ok(d.into_any())
    }

    fn __str__(&self) -> String {
        self.text()
    }

    fn __repr__(&self) -> String {
        format!("Diagnosis(kinds={:?})", self.kinds())
    }
}
