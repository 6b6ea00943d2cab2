//! The workload every contender runs, and the lower bound the scenario's capacity allows.

use std::time::Duration;

use aoai_sim::Scenario;
use aoai_sim::driver::workload::{self, Arrival};
use aoai_sim::scenario::DeploymentKind;
use serde_json::{Value, json};

/// One place the workload may send to (a `resource/deployment` of the scenario's workload).
#[derive(Debug, Clone)]
pub struct Target {
    /// `resource/deployment`.
    pub name: String,
    /// The resource's name (its URL is `{server}/r/{resource}`).
    pub resource: String,
    /// The deployment's name.
    pub deployment: String,
    /// The resource's key.
    pub api_key: String,
    /// The resource's region.
    pub region: String,
    /// Whether the deployment is provisioned (PTU).
    pub provisioned: bool,
    /// 0 for provisioned deployments when the workload mixes kinds, else 0 for all; standard
    /// deployments next to provisioned ones are tier 1 (the spillover).
    pub tier: u8,
}

/// The workload of a scenario, cut to `duration_s` when given.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The scenario's name.
    pub scenario: String,
    /// Virtual seconds of arrivals.
    pub duration_s: f64,
    /// Where calls may go; a single-endpoint client uses the first.
    pub targets: Vec<Target>,
    /// Every call, in arrival order.
    pub arrivals: Vec<Arrival>,
    /// The request body (without `stream`).
    pub body: Value,
    /// Lower bounds from the scenario's capacity.
    pub bound: Bound,
}

/// What no client can beat on this scenario.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The median service time of one call with no queueing and no retry (virtual seconds).
    pub service_s: f64,
    /// The shortest possible makespan (virtual seconds): the latest of last arrival plus service
    /// time, the token quota and the request quota of all targets together.
    pub makespan_s: f64,
    /// Which constraint set the makespan bound.
    pub limited_by: &'static str,
}

impl Schedule {
    /// Reads the scenario's workload. Errors name what is missing.
    pub fn from_scenario(scenario: &Scenario, duration_s: Option<f64>) -> Result<Self, String> {
        let mut workload = scenario
            .workload
            .clone()
            .ok_or_else(|| format!("scenario {} has no [workload]", scenario.name))?;
        if let Some(d) = duration_s {
            if !(d.is_finite() && d > 0.0) {
                return Err(format!("--duration must be positive, got {d}"));
            }
            workload.duration_s = workload.duration_s.min(d);
        }
        let any_ptu = workload.targets.iter().any(|t| {
            scenario.find_target(t).is_some_and(|(r, d)| {
                scenario.resources[r].deployments[d].kind == DeploymentKind::Provisioned
            })
        });
        let mut targets = Vec::new();
        for t in &workload.targets {
            let (r, d) = scenario
                .find_target(t)
                .ok_or_else(|| format!("workload target {t:?} is not in the scenario"))?;
            let res = &scenario.resources[r];
            let dep = &res.deployments[d];
            let provisioned = dep.kind == DeploymentKind::Provisioned;
            targets.push(Target {
                name: t.clone(),
                resource: res.name.clone(),
                deployment: dep.name.clone(),
                api_key: res.api_key.clone(),
                region: res.region.clone(),
                provisioned,
                tier: u8::from(any_ptu && !provisioned),
            });
        }
        let arrivals = workload::arrivals(&workload, scenario.seed);
        let body: Value = serde_json::from_slice(&workload::request_body(&workload.request, false))
            .map_err(|e| format!("request body: {e}"))?;
        let bound = bound(scenario, &targets, &arrivals, &body);
        Ok(Self {
            scenario: scenario.name.clone(),
            duration_s: workload.duration_s,
            targets,
            arrivals,
            body,
            bound,
        })
    }

    /// The JSON the Python harness reads (`aoai-bench schedule`).
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "duration_s": self.duration_s,
            "targets": self.targets.iter().map(|t| json!({
                "name": t.name,
                "resource": t.resource,
                "deployment": t.deployment,
                "api_key": t.api_key,
                "region": t.region,
                "provisioned": t.provisioned,
                "tier": t.tier,
            })).collect::<Vec<_>>(),
            "arrivals": self.arrivals.iter().map(|a| json!({
                "at": a.at.as_secs_f64(),
                "stream": a.stream,
            })).collect::<Vec<_>>(),
            "body": self.body,
            "bound": {
                "service_s": self.bound.service_s,
                "makespan_s": self.bound.makespan_s,
                "limited_by": self.bound.limited_by,
            },
        })
    }
}

fn bound(scenario: &Scenario, targets: &[Target], arrivals: &[Arrival], body: &Value) -> Bound {
    let output = scenario.response.output_tokens as f64;
    // The fastest region serves at its median latency (the jitter is a lognormal factor of
    // median 1).
    let service_s = targets
        .iter()
        .filter_map(|t| scenario.regions.iter().find(|r| r.name == t.region))
        .map(|r| (r.latency.first_token_ms + r.latency.per_token_ms * output) / 1000.0)
        .fold(f64::INFINITY, f64::min);
    let service_s = if service_s.is_finite() {
        service_s
    } else {
        0.0
    };
    let first = arrivals.first().map_or(Duration::ZERO, |a| a.at);
    let last = arrivals.last().map_or(Duration::ZERO, |a| a.at);
    let by_arrivals = (last - first).as_secs_f64() + service_s;
    let tokens_per_call = scenario
        .tokens
        .estimator()
        .map(|e| e.estimate(body.to_string().as_bytes()))
        .unwrap_or(0) as f64;
    let mut tpm = 0.0;
    let mut rpm = 0.0;
    let mut rpm_known = true;
    for t in targets {
        if let Some((r, d)) = scenario.find_target(&t.name) {
            let dep = &scenario.resources[r].deployments[d];
            tpm += dep.tpm as f64;
            match dep.requests_per_minute() {
                Some(x) => rpm += x,
                None => rpm_known = false,
            }
        }
    }
    let calls = arrivals.len() as f64;
    // A full minute's quota can be spent at once, so the quota only binds beyond the first
    // minute.
    let by_tokens = if tpm > 0.0 {
        (calls * tokens_per_call / tpm - 1.0).max(0.0) * 60.0 + service_s
    } else {
        0.0
    };
    let by_requests = if rpm_known && rpm > 0.0 {
        (calls / rpm - 1.0).max(0.0) * 60.0 + service_s
    } else {
        0.0
    };
    let (makespan_s, limited_by) = [
        (by_arrivals, "arrivals"),
        (by_tokens, "tokens per minute"),
        (by_requests, "requests per minute"),
    ]
    .into_iter()
    .fold(
        (0.0, "arrivals"),
        |acc, x| if x.0 > acc.0 { x } else { acc },
    );
    Bound {
        service_s,
        makespan_s,
        limited_by,
    }
}
