//! A test and benchmark hook: one request through the Rust `RetryLayer` over a real hyper client,
//! so a test can check that the Rust layer and the Python transports behave the same.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_aoai::RetryLayer;

use crate::engine::{Engine, config_error};

/// What `_run_retry_layer` saw: status, attempts, waits between attempts (seconds), body and the
/// `x-should-retry` header of the final response.
type Outcome<'py> = (u16, usize, Vec<f64>, Bound<'py, PyBytes>, Option<String>);

/// When each attempt started and when its response headers arrived.
#[derive(Default)]
struct Timeline {
    attempts: Vec<(Instant, Option<Instant>)>,
}

impl Timeline {
    /// The time from each attempt's response to the next attempt's start.
    fn waits(&self) -> Vec<f64> {
        self.attempts
            .windows(2)
            .map(|w| {
                let end = w[0].1.unwrap_or(w[0].0);
                w[1].0.saturating_duration_since(end).as_secs_f64()
            })
            .collect()
    }
}

/// Sends one request through `tower_aoai::RetryLayer` (configured from `engine`'s settings, with a
/// fresh budget and the engine's seed) over a hyper HTTP/1 client, on a current-thread tokio
/// runtime with the GIL released. A test/benchmark hook, not a client API.
///
/// Returns `(status, attempts, waits, body, x_should_retry)`; waits are measured on the client side
/// from each response to the next attempt.
#[pyfunction]
#[pyo3(signature = (engine, url, *, method = "POST", body = Vec::new(), headers = Vec::new()))]
pub fn _run_retry_layer<'py>(
    py: Python<'py>,
    engine: &Engine,
    url: &str,
    method: &str,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
) -> PyResult<Outcome<'py>> {
    let settings = engine.shared.settings;
    let policy = settings.policy().map_err(|e| config_error(&e))?;
    let budget = settings.budget().map_err(|e| config_error(&e))?;
    let mut layer = RetryLayer::new(policy).with_budget(budget);
    if let Some(seed) = settings.seed {
        layer = layer.with_seed(seed);
    }
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| PyValueError::new_err(format!("invalid `method`: {method:?}")))?;
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in &headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| PyValueError::new_err(format!("invalid request: {e}")))?;

    let (status, attempts, waits, body, should_retry) = py.detach(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("tokio runtime: {e}")))?;
        runtime.block_on(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let timeline = Arc::new(Mutex::new(Timeline::default()));
            let seen = timeline.clone();
            let backend = service_fn(move |req: Request<Full<Bytes>>| {
                let client = client.clone();
                let seen = seen.clone();
                async move {
                    let index = {
                        let mut t = seen.lock().unwrap_or_else(|e| e.into_inner());
                        t.attempts.push((Instant::now(), None));
                        t.attempts.len() - 1
                    };
                    let res = client.request(req).await;
                    seen.lock().unwrap_or_else(|e| e.into_inner()).attempts[index].1 =
                        Some(Instant::now());
                    res
                }
            });
            let svc = ServiceBuilder::new().layer(layer).service(backend);
            let res = svc
                .oneshot(request)
                .await
                .map_err(|e| PyRuntimeError::new_err(format!("request failed: {e}")))?;
            let status = res.status().as_u16();
            let should_retry = res
                .headers()
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| PyRuntimeError::new_err(format!("reading the body: {e}")))?
                .to_bytes()
                .to_vec();
            let t = timeline.lock().unwrap_or_else(|e| e.into_inner());
            Ok::<_, PyErr>((status, t.attempts.len(), t.waits(), body, should_retry))
        })
    })?;
    Ok((
        status,
        attempts,
        waits,
        PyBytes::new(py, &body),
        should_retry,
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn waits_run_from_each_response_to_the_next_attempt() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let timeline = Timeline {
            attempts: vec![
                (t0, Some(t0 + ms(5))),
                (t0 + ms(35), Some(t0 + ms(40))),
                (t0 + ms(140), None),
            ],
        };
        let waits = timeline.waits();
        assert_eq!(waits.len(), 2);
        assert!((waits[0] - 0.030).abs() < 1e-9);
        assert!((waits[1] - 0.100).abs() < 1e-9);
    }
}
