//! Routing figures on the simulator: single backend vs. failover without hedging vs. failover
//! with hedging, over four scenarios (regional capacity throttling with a second region,
//! provisioned plus spillover, a regional outage, one region slow) and a fifth where every
//! region's latency is heavy-tailed (where hedging, rather than routing, cuts the tail).
//!
//! ```text
//! cargo run -p aoai-sim --example router_table
//! ```
//!
//! (`ROUTER_TABLE_DEBUG=1` also prints each hedged run's full report and router counters.)
//!
//! Every client runs tower-aoai's own cores in virtual time: the single backend is the retry core
//! (`RetryPolicy` + `RetryBudget`) on the first target; the routed clients put the same retry
//! core above the router core (`policy::route::Router`), as `tower_aoai::stack::Stack` composes
//! `RetryLayer` over `RouteLayer`: failover inside one retry attempt, the router's waits bounded by
//! the retry deadline, hedges after the primary's p95 within a 5 % budget. The simulator cannot
//! cancel an attempt, so a hedge's loser still runs to its end on the server.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use aoai_sim::Scenario;
use aoai_sim::driver::{
    self, Attempt, AttemptId, Call, CallId, Client, ClientPoll, Done, RetryClient,
};
use tower_aoai::policy::classify::{Classification, Outcome, TransportError, classify_error};
use tower_aoai::policy::route::{
    Backend, BackendId, Backends, HedgePolicy, Pick, RouteCall, RoutePolicy, Router, Step,
};
use tower_aoai::policy::{Action, CallState, RetryBudget, RetryPolicy};

const COMMON: &str = r#"
seed = 7
[[regions]]
name = "eastus2"
latency = { first_token_ms = 300, per_token_ms = 10, jitter = 0.25 }
capacity = { max_per_second = 4, reject_share = 0.2, retry_after_s = 10 }
[[regions]]
name = "swedencentral"
latency = { first_token_ms = 350, per_token_ms = 10, jitter = 0.25 }
"#;

/// A standard deployment in each region, and the workload's span and targets (its arrivals
/// follow).
const TWO_REGIONS: &str = r#"
[[resources]]
name = "east"
region = "eastus2"
api_key = "ke"
[[resources.deployments]]
name = "gpt-4o"
tpm = 2000000
rpm = 12000
[[resources]]
name = "west"
region = "swedencentral"
api_key = "kw"
[[resources.deployments]]
name = "gpt-4o"
tpm = 2000000
rpm = 12000
[workload]
duration_s = 300
targets = ["east/gpt-4o", "west/gpt-4o"]"#;

/// (name, scenario TOML, the tier of each target for the routed clients).
fn scenarios() -> Vec<(&'static str, String, Vec<u8>)> {
    vec![
        (
            "regional capacity",
            format!(
                r#"{COMMON}
[[events]]
kind = "high_demand"
region = "eastus2"
start_s = 30
end_s = 240
{TWO_REGIONS}
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 8
"#
            ),
            vec![0, 0],
        ),
        (
            "PTU + spillover",
            format!(
                r#"{COMMON}
[[resources]]
name = "east"
region = "eastus2"
api_key = "ke"
[[resources.deployments]]
name = "ptu"
kind = "provisioned"
tpm = 150000
[[resources.deployments]]
name = "paygo"
tpm = 1000000
rpm = 6000
[workload]
duration_s = 300
targets = ["east/ptu", "east/paygo"]
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 5
[[workload.arrivals]]
kind = "bursts"
size = 40
every_s = 60
spread_ms = 2000
"#
            ),
            vec![0, 1],
        ),
        (
            "regional outage",
            format!(
                r#"{COMMON}
[[events]]
kind = "outage"
region = "eastus2"
start_s = 60
end_s = 180
{TWO_REGIONS}
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 5
"#
            ),
            vec![0, 0],
        ),
        (
            "one region slow",
            format!(
                r#"{COMMON}
[[events]]
kind = "slow"
region = "eastus2"
start_s = 60
end_s = 240
factor = 6
{TWO_REGIONS}
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 5
"#
            ),
            vec![0, 0],
        ),
        (
            "heavy-tailed latency",
            format!(
                r#"
seed = 7
[[regions]]
name = "eastus2"
latency = {{ first_token_ms = 300, per_token_ms = 10, jitter = 0.9 }}
[[regions]]
name = "swedencentral"
latency = {{ first_token_ms = 350, per_token_ms = 10, jitter = 0.9 }}
{TWO_REGIONS}
[[workload.arrivals]]
kind = "poisson"
rate_per_s = 5
"#
            ),
            vec![0, 0],
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The router said: wait for the first backend to come back.
    Route,
    /// The retry core said: try again (a new routing round).
    Retry,
    /// The primary attempt is slow: hedge it.
    Hedge,
}

struct CallSt {
    retry: CallState,
    route: RouteCall,
    in_flight: Vec<AttemptId>,
    primary: Option<BackendId>,
    last: Option<Classification>,
    generation: u64,
}

/// The retry core above the router core, in virtual time.
struct RoutedClient {
    router: Router,
    retry: RetryPolicy,
    budget: RetryBudget,
    rng: fastrand::Rng,
    epoch: Instant,
    calls: HashMap<CallId, CallSt>,
    attempts: HashMap<AttemptId, (CallId, BackendId, Duration)>,
    next_attempt: AttemptId,
    timers: BTreeMap<(Duration, u64), (CallId, Timer, u64)>,
    seq: u64,
    sends: Vec<Attempt>,
    finished: Vec<(CallId, Outcome)>,
}

impl RoutedClient {
    fn new(tiers: &[u8], hedge: bool, seed: u64) -> Self {
        let list = tiers
            .iter()
            .enumerate()
            .map(|(i, tier)| {
                Backend::new(format!("t{i}"), format!("https://t{i}.example")).with_tier(*tier)
            })
            .collect();
        let mut policy = RoutePolicy::default();
        if !hedge {
            policy = policy.with_hedge(HedgePolicy::disabled());
        }
        Self {
            router: Router::new(Backends::new(list).expect("valid backends"), policy),
            retry: RetryPolicy::default(),
            budget: RetryBudget::default(),
            rng: fastrand::Rng::with_seed(seed),
            epoch: Instant::now(),
            calls: HashMap::new(),
            attempts: HashMap::new(),
            next_attempt: 0,
            timers: BTreeMap::new(),
            seq: 0,
            sends: Vec::new(),
            finished: Vec::new(),
        }
    }

    fn at(&self, now: Duration) -> Instant {
        self.epoch + now
    }

    fn timer(&mut self, at: Duration, call: CallId, kind: Timer) {
        let generation = self.calls.get(&call).map_or(0, |c| c.generation);
        self.seq += 1;
        self.timers.insert((at, self.seq), (call, kind, generation));
    }

    fn send(&mut self, now: Duration, call: CallId, id: BackendId) {
        let Some(st) = self.calls.get_mut(&call) else {
            return;
        };
        self.router.on_send(&mut st.route, id, self.epoch + now);
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        st.in_flight.push(attempt);
        self.attempts.insert(attempt, (call, id, now));
        self.sends.push(Attempt {
            call,
            attempt,
            target: id.index(),
        });
    }

    /// Asks the router where the call's next attempt goes, and carries it out.
    fn route(&mut self, now: Duration, call: CallId) {
        let t = self.at(now);
        let Some(st) = self.calls.get(&call) else {
            return;
        };
        let pick = self.router.pick(&st.route, t, &|_| 1.0, &mut self.rng);
        match pick {
            Pick::Send(id) => {
                self.send(now, call, id);
                let st = self.calls.get_mut(&call).expect("call");
                st.primary = Some(id);
                st.generation += 1;
                if let Some(after) = self.router.hedge_delay(&st.route, id, self.epoch + now) {
                    self.timer(now + after, call, Timer::Hedge);
                }
            }
            Pick::Wait(at) => {
                let at = at.saturating_duration_since(self.epoch);
                self.calls.get_mut(&call).expect("call").generation += 1;
                self.timer(at, call, Timer::Route);
            }
            Pick::GiveUp(no) => {
                let st = self.calls.get_mut(&call).expect("call");
                let class = match st.last.take() {
                    Some(class) => class,
                    None if no.blocked.is_some() => {
                        return self.finish(call, Outcome::Blocked);
                    }
                    None => classify_error(TransportError::Connect),
                };
                self.retry_or_finish(now, call, class);
            }
            _ => self.finish(
                call,
                Outcome::Transient(tower_aoai::policy::TransientKind::Connect),
            ),
        }
    }

    fn retry_or_finish(&mut self, now: Duration, call: CallId, class: Classification) {
        let t = self.at(now);
        let Some(st) = self.calls.get_mut(&call) else {
            return;
        };
        match self
            .retry
            .on_attempt(&mut st.retry, &class, t, &mut self.budget, &mut self.rng)
        {
            Action::Retry { after, .. } => {
                st.generation += 1;
                self.timer(now + after, call, Timer::Retry);
            }
            _ => self.finish(call, class.outcome),
        }
    }

    fn finish(&mut self, call: CallId, outcome: Outcome) {
        if let Some(st) = self.calls.remove(&call) {
            for attempt in st.in_flight {
                if let Some((_, id, _)) = self.attempts.remove(&attempt) {
                    self.router.on_cancel(id);
                }
            }
            self.finished.push((call, outcome));
        }
    }
}

impl Client for RoutedClient {
    fn on_arrival(&mut self, now: Duration, call: &Call) {
        let t = self.at(now);
        let retry = self.retry.start(t, None, &mut self.budget);
        let route = self.router.start(t, retry.deadline());
        self.calls.insert(
            call.id,
            CallSt {
                retry,
                route,
                in_flight: Vec::new(),
                primary: None,
                last: None,
                generation: 0,
            },
        );
        self.route(now, call.id);
    }

    fn on_response(&mut self, now: Duration, done: &Done<'_>) {
        // A cancelled attempt (a hedge's loser, a finished call) is ignored: the router was told.
        let Some((call, id, sent)) = self.attempts.remove(&done.attempt.attempt) else {
            return;
        };
        let t = self.at(now);
        let class = done.classify();
        let step = self
            .router
            .on_response(id, &class, now.saturating_sub(sent), t, &mut self.rng);
        let Some(st) = self.calls.get_mut(&call) else {
            return;
        };
        st.in_flight.retain(|a| *a != done.attempt.attempt);
        if done.broke_mid_stream() {
            // Committed: the response was handed up before it broke.
            return self.finish(
                call,
                Outcome::Transient(tower_aoai::policy::TransientKind::Connect),
            );
        }
        if step == Step::Return {
            return self.finish(call, class.outcome);
        }
        st.last = Some(class);
        if st.in_flight.is_empty() {
            // Fail over at once (a new pick within the same retry attempt).
            st.generation += 1;
            self.route(now, call);
        }
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        while let Some((&key, &(call, kind, generation))) = self.timers.first_key_value() {
            if key.0 > now {
                break;
            }
            self.timers.remove(&key);
            let Some(st) = self.calls.get_mut(&call) else {
                continue;
            };
            if st.generation != generation {
                continue;
            }
            match kind {
                Timer::Route => self.route(now, call),
                Timer::Retry => {
                    let t = self.epoch + now;
                    st.route = self.router.start(t, st.retry.deadline());
                    self.route(now, call);
                }
                Timer::Hedge => {
                    let Some(primary) = st.primary else { continue };
                    if st.in_flight.len() != 1 {
                        continue;
                    }
                    let t = self.epoch + now;
                    let hedge =
                        self.router
                            .pick_hedge(&mut st.route, primary, t, &|_| 1.0, &mut self.rng);
                    if let Some(h) = hedge {
                        self.send(now, call, h);
                    }
                }
            }
        }
        ClientPoll {
            sends: std::mem::take(&mut self.sends),
            finished: std::mem::take(&mut self.finished),
            wake_at: self.timers.first_key_value().map(|(k, _)| k.0),
        }
    }
}

fn main() {
    println!(
        "| scenario | client | success | 429 / 100 ok | p50 s | p99 s | hedge extra requests |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, toml, tiers) in scenarios() {
        let scenario = Scenario::from_toml(&toml).unwrap_or_else(|e| panic!("{name}: {e}"));
        let single = driver::run(&scenario, &mut RetryClient::new(1)).expect("run");
        row(name, "single backend (retry)", &single, None);
        let mut failover = RoutedClient::new(&tiers, false, 1);
        let report = driver::run(&scenario, &mut failover).expect("run");
        row(name, "failover", &report, None);
        let mut hedged = RoutedClient::new(&tiers, true, 1);
        let report = driver::run(&scenario, &mut hedged).expect("run");
        let stats = hedged.router.stats();
        if std::env::var_os("ROUTER_TABLE_DEBUG").is_some() {
            eprintln!("{name}: {report}\n{stats:?}");
        }
        row(
            name,
            "failover + hedging",
            &report,
            Some(stats.hedges as f64 / stats.calls.max(1) as f64),
        );
    }
}

fn row(scenario: &str, client: &str, r: &driver::Report, hedge: Option<f64>) {
    let per100 = if r.successes == 0 {
        f64::INFINITY
    } else {
        r.throttled() as f64 * 100.0 / r.successes as f64
    };
    println!(
        "| {scenario} | {client} | {:.1} % | {:.1} | {:.2} | {:.2} | {} |",
        r.success_rate() * 100.0,
        per100,
        r.latency_p50.as_secs_f64(),
        r.latency_p99.as_secs_f64(),
        hedge.map_or("-".to_owned(), |h| format!("{:.1} %", h * 100.0)),
    );
}
