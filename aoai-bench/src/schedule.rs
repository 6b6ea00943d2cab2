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
    /// The oracle's schedule: every call, in arrival order, sent once at the earliest instant a
    /// target admits it (request windows, token quota, regional capacity, outages known in
    /// advance), served in its region's median time.
    pub oracle: Oracle,
}

/// What the oracle client achieves (virtual seconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Oracle {
    /// First arrival to last finish.
    pub makespan_s: f64,
    /// Median arrival-to-finish latency.
    pub latency_p50_s: f64,
    /// 99th percentile arrival-to-finish latency.
    pub latency_p99_s: f64,
    /// Calls no target could ever admit (none in the shipped scenarios).
    pub unserved: usize,
}

impl Schedule {
    /// Reads the scenario's workload (its targets replaced by `targets` when not empty). Errors
    /// name what is missing.
    pub fn from_scenario(
        scenario: &Scenario,
        duration_s: Option<f64>,
        targets: &[String],
    ) -> Result<Self, String> {
        let mut workload = scenario
            .workload
            .clone()
            .ok_or_else(|| format!("scenario {} has no [workload]", scenario.name))?;
        if !targets.is_empty() {
            workload.targets = targets.to_vec();
        }
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
                "oracle": {
                    "makespan_s": self.bound.oracle.makespan_s,
                    "latency_p50_s": self.bound.oracle.latency_p50_s,
                    "latency_p99_s": self.bound.oracle.latency_p99_s,
                    "unserved": self.bound.oracle.unserved,
                },
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
    let oracle = oracle(scenario, targets, arrivals, tokens_per_call);
    let (makespan_s, limited_by) = if oracle.makespan_s > makespan_s {
        (oracle.makespan_s, "oracle schedule")
    } else {
        (makespan_s, limited_by)
    };
    Bound {
        service_s,
        makespan_s,
        limited_by,
        oracle,
    }
}

/// One sliding-window limit: at most `limit` starts within any `width` seconds.
#[derive(Debug, Clone, Copy)]
struct Limit {
    width: f64,
    limit: usize,
}

/// The earliest time at or after `t` when one more start fits under `limit`, given the `starts`
/// so far (sorted).
fn window_release(starts: &[f64], t: f64, l: Limit) -> f64 {
    let inside: Vec<f64> = starts
        .iter()
        .copied()
        .filter(|s| *s > t - l.width)
        .collect();
    if inside.len() < l.limit {
        t
    } else {
        inside[inside.len() - l.limit] + l.width
    }
}

/// Where the simulator's abuse detector would block a resource whose requests start at `seq`
/// (sorted): the start of the offending burst, if any.
fn abuse_violation(seq: &[f64], cfg: &aoai_sim::scenario::Abuse) -> Option<f64> {
    let (mut last, mut burst, mut count): (Option<f64>, Option<f64>, u32) = (None, None, 0);
    for &s in seq {
        let idle = last.map_or(cfg.idle_at_start, |l| s - l >= cfg.idle_s);
        if idle {
            burst = Some(s);
            count = 0;
        }
        last = Some(s);
        if let Some(b) = burst {
            if s - b <= cfg.burst_window_s {
                count += 1;
                if count > cfg.burst_requests {
                    return Some(b);
                }
            } else {
                burst = None;
            }
        }
    }
    None
}

fn oracle(scenario: &Scenario, targets: &[Target], arrivals: &[Arrival], tokens: f64) -> Oracle {
    use aoai_sim::scenario::EventKind;
    let output = scenario.response.output_tokens as f64;
    let region_of = |name: &str| scenario.regions.iter().position(|r| r.name == name);
    // The simulator's windows slide in steps of 1 % of their width: 0.99 keeps this a bound.
    const SLACK: f64 = 0.99;
    struct Lane {
        region: usize,
        resource: String,
        limits: Vec<Limit>,
        starts: Vec<f64>,
    }
    let mut lanes: Vec<Lane> = Vec::new();
    for t in targets {
        let (Some((r, d)), Some(region)) = (scenario.find_target(&t.name), region_of(&t.region))
        else {
            continue;
        };
        let dep = &scenario.resources[r].deployments[d];
        let mut limits = Vec::new();
        if dep.kind == DeploymentKind::Standard {
            if let Some(rpm) = dep.requests_per_minute() {
                let windows = if dep.rpm_windows_s.is_empty() {
                    vec![60]
                } else {
                    dep.rpm_windows_s.clone()
                };
                for w in windows {
                    let limit = (rpm * f64::from(w) / 60.0).floor().max(1.0) as usize;
                    limits.push(Limit {
                        width: f64::from(w) * SLACK,
                        limit,
                    });
                }
            }
            if tokens > 0.0 && dep.tpm > 0 {
                limits.push(Limit {
                    width: 60.0 * SLACK,
                    limit: ((dep.tpm as f64 / tokens).floor() as usize).max(1),
                });
            }
        }
        lanes.push(Lane {
            region,
            resource: t.resource.clone(),
            limits,
            starts: Vec::new(),
        });
    }
    let service: Vec<f64> = scenario
        .regions
        .iter()
        .map(|r| (r.latency.first_token_ms + r.latency.per_token_ms * output) / 1000.0)
        .collect();
    let abuse_cfg = |lane: &Lane| {
        scenario
            .resources
            .iter()
            .find(|r| r.name == lane.resource)
            .and_then(|r| r.abuse)
    };
    // Starts per region, for the capacity limits.
    let mut region_starts: Vec<Vec<f64>> = vec![Vec::new(); scenario.regions.len()];
    let mut latencies = Vec::with_capacity(arrivals.len());
    let mut last_finish: f64 = 0.0;
    let mut unserved = 0;
    let horizon = arrivals.last().map_or(0.0, |a| a.at.as_secs_f64()) + 86_400.0;
    for a in arrivals {
        let arrival = a.at.as_secs_f64();
        let mut t = arrival;
        let mut placed = None;
        for _ in 0..100_000 {
            if t > horizon {
                break;
            }
            let mut next = f64::INFINITY;
            for (k, lane) in lanes.iter().enumerate() {
                let mut release = t;
                // Outages (any mode) of its region or resource: no answer until the end.
                for e in &scenario.events {
                    let applies = e.region.as_deref()
                        == Some(scenario.regions[lane.region].name.as_str())
                        || e.resource.as_deref() == Some(lane.resource.as_str());
                    if e.kind == EventKind::Outage && applies && e.start_s <= t && t < e.end_s {
                        release = release.max(e.end_s);
                    }
                }
                for l in &lane.limits {
                    release = release.max(window_release(&lane.starts, t, *l));
                }
                // Regional capacity: always on, or during a high-demand event of the region.
                let cap = &scenario.regions[lane.region].capacity;
                let event = scenario.events.iter().find(|e| {
                    e.kind == EventKind::HighDemand
                        && e.region.as_deref() == Some(scenario.regions[lane.region].name.as_str())
                        && e.start_s <= t
                        && t < e.end_s
                });
                if cap.always || event.is_some() {
                    let max_c = event
                        .and_then(|e| e.max_concurrent)
                        .unwrap_or(cap.max_concurrent);
                    let max_s = event
                        .and_then(|e| e.max_per_second)
                        .unwrap_or(cap.max_per_second);
                    let starts = &region_starts[lane.region];
                    // Refused when `max_per_second` already arrived in the last second (the
                    // newcomer counted or not: the looser reading keeps this a bound).
                    release = release.max(window_release(
                        starts,
                        t,
                        Limit {
                            width: SLACK,
                            limit: max_s as usize + 1,
                        },
                    ));
                    let svc = service[lane.region];
                    let mut busy: Vec<f64> = starts
                        .iter()
                        .map(|s| s + svc)
                        .filter(|end| *end > t)
                        .collect();
                    if busy.len() >= max_c as usize {
                        busy.sort_by(f64::total_cmp);
                        release = release.max(busy[busy.len() - max_c as usize]);
                    }
                }
                // After idle, no more than `burst_requests` in the burst window: replay the
                // resource's starts with this one, as the detector would see them.
                if let Some(cfg) = abuse_cfg(lane) {
                    let mut seq: Vec<f64> = lanes
                        .iter()
                        .filter(|l| l.resource == lane.resource)
                        .flat_map(|l| l.starts.iter().copied())
                        .collect();
                    seq.push(t);
                    seq.sort_by(f64::total_cmp);
                    if let Some(burst) = abuse_violation(&seq, &cfg) {
                        let end = burst + cfg.burst_window_s + 1e-3;
                        release = release.max(if end > t { end } else { t + cfg.burst_window_s });
                    }
                }
                if release <= t {
                    placed = Some(k);
                    break;
                }
                next = next.min(release);
            }
            if placed.is_some() || !next.is_finite() {
                break;
            }
            t = next;
        }
        let Some(k) = placed else {
            unserved += 1;
            continue;
        };
        let region = lanes[k].region;
        lanes[k].starts.push(t);
        region_starts[region].push(t);
        let finish = t + service[region];
        latencies.push(finish - arrival);
        last_finish = last_finish.max(finish);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize]
        }
    };
    let first = arrivals.first().map_or(0.0, |a| a.at.as_secs_f64());
    Oracle {
        makespan_s: (last_finish - first).max(0.0),
        latency_p50_s: pct(0.5),
        latency_p99_s: pct(0.99),
        unserved,
    }
}
