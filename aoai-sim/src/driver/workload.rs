//! Turning a scenario's workload into calls.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::scenario::{ArrivalKind, RequestShape, Workload};

/// One call's arrival time and whether it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When the call arrives (virtual time since the start).
    pub at: Duration,
    /// Whether the request asks for `stream: true`.
    pub stream: bool,
}

/// The request body a workload sends (`stream` selects the streaming variant).
pub fn request_body(shape: &RequestShape, stream: bool) -> Bytes {
    let mut body = json!({
        "messages": [{"role": "user", "content": "x".repeat(usize::try_from(shape.prompt_chars).unwrap_or(0))}],
    });
    if shape.max_tokens > 0 {
        body["max_tokens"] = json!(shape.max_tokens);
    }
    if stream {
        body["stream"] = json!(true);
    }
    Bytes::from(body.to_string())
}

/// Every call of the workload, in arrival order; random choices (Poisson gaps, which calls
/// stream) come from `seed`.
pub fn arrivals(workload: &Workload, seed: u64) -> Vec<Arrival> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_a221_7a15);
    let mut times: Vec<Duration> = Vec::new();
    for a in &workload.arrivals {
        let start = a.start_s;
        let end = a
            .end_s
            .unwrap_or(workload.duration_s)
            .min(workload.duration_s);
        match a.kind {
            ArrivalKind::Steady => {
                let rate = a.rate_per_s.unwrap_or(1.0);
                let mut i = 0u64;
                loop {
                    let t = start + i as f64 / rate;
                    if t >= end {
                        break;
                    }
                    times.push(Duration::from_secs_f64(t));
                    i += 1;
                }
            }
            ArrivalKind::Poisson => {
                let rate = a.rate_per_s.unwrap_or(1.0);
                let mut t = start;
                loop {
                    t += -(1.0 - rng.f64()).ln() / rate;
                    if t >= end {
                        break;
                    }
                    times.push(Duration::from_secs_f64(t));
                }
            }
            ArrivalKind::Bursts => {
                let size = a.size.unwrap_or(1);
                let spread = a.spread_ms / 1000.0;
                let mut burst = start;
                while burst < end {
                    for k in 0..size {
                        let offset = if size > 1 {
                            spread * f64::from(k) / f64::from(size - 1)
                        } else {
                            0.0
                        };
                        times.push(Duration::from_secs_f64(burst + offset));
                    }
                    match a.every_s {
                        Some(every) => burst += every,
                        None => break,
                    }
                }
            }
        }
    }
    times.sort();
    times
        .into_iter()
        .map(|at| Arrival {
            at,
            stream: workload.request.stream_share > 0.0
                && rng.f64() < workload.request.stream_share,
        })
        .collect()
}
