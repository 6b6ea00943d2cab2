//! The virtual-time driver: determinism, baseline clients, custom clients, long runs.

use std::time::Duration;

use aoai_sim::Scenario;
use aoai_sim::driver::{self, Call, Client, ClientPoll, Done, NaiveClient, Outbox, RetryClient};
use tower_aoai::policy::classify::Outcome;
use tower_aoai::policy::{RetryBudget, RetryPolicy};

fn shipped(name: &str) -> Scenario {
    Scenario::load(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scenarios")
            .join(name),
    )
    .unwrap()
}

/// One region whose capacity refuses from `start` to `end` (every request), asking for
/// `retry_s`; a second healthy region.
fn capacity_window(start: f64, end: f64, retry_s: f64, workload: &str) -> Scenario {
    Scenario::from_toml(&format!(
        r#"
        [response]
        output_tokens = 10
        [[regions]]
        name = "eastus2"
        latency = {{ first_token_ms = 200, per_token_ms = 10, error_ms = 10 }}
        capacity = {{ retry_after_s = {retry_s} }}
        [[regions]]
        name = "swedencentral"
        latency = {{ first_token_ms = 200, per_token_ms = 10, error_ms = 10 }}
        [[resources]]
        name = "east"
        region = "eastus2"
        api_key = "k1"
        [[resources.deployments]]
        name = "gpt-4o"
        tpm = 100000000
        [[resources]]
        name = "sweden"
        region = "swedencentral"
        api_key = "k2"
        [[resources.deployments]]
        name = "gpt-4o"
        tpm = 100000000
        [[events]]
        kind = "high_demand"
        region = "eastus2"
        start_s = {start}
        end_s = {end}
        max_concurrent = 0
        [workload]
        targets = ["east/gpt-4o", "sweden/gpt-4o"]
        {workload}
        "#
    ))
    .unwrap()
}

#[test]
fn same_seed_same_report() {
    for name in [
        "seed-429-regional.toml",
        "regional-outage.toml",
        "seed-429-peak-low-traffic.toml",
    ] {
        let scenario = shipped(name);
        let a = driver::run(&scenario, &mut NaiveClient::new(5)).unwrap();
        let b = driver::run(&scenario, &mut NaiveClient::new(5)).unwrap();
        assert_eq!(a, b, "{name}");
        let c = driver::run(&scenario, &mut RetryClient::new(5)).unwrap();
        let d = driver::run(&scenario, &mut RetryClient::new(5)).unwrap();
        assert_eq!(c, d, "{name}");
    }
    // Another scenario seed changes the run.
    let mut scenario = shipped("seed-429-regional.toml");
    let a = driver::run(&scenario, &mut NaiveClient::new(5)).unwrap();
    scenario.seed += 1;
    let b = driver::run(&scenario, &mut NaiveClient::new(5)).unwrap();
    assert_ne!(a, b);
}

#[test]
fn an_hour_of_traffic_runs_in_virtual_time() {
    let scenario = capacity_window(
        1000.0,
        1100.0,
        5.0,
        "duration_s = 3600\n[[workload.arrivals]]\nkind = \"steady\"\nrate_per_s = 5.0",
    );
    let report = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
    assert_eq!(report.calls, 18_000);
    assert_eq!(report.unfinished, 0);
    assert!(report.makespan >= Duration::from_secs(3599));
    // During the 100 s of high demand the naive client fails calls after 3 attempts.
    assert!(report.throttles["capacity"] > 0);
    assert_eq!(report.successes + report.failed(), 18_000);
}

#[test]
fn naive_client_honours_retry_after_and_retries_twice() {
    // Refused from 0 to 4 s, asking for 5 s: a call at 0 succeeds on its first retry at 5 s.
    let scenario = capacity_window(
        0.0,
        4.0,
        5.0,
        "duration_s = 0.5\n[[workload.arrivals]]\nkind = \"bursts\"\nsize = 1",
    );
    let report = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
    assert_eq!(report.successes, 1);
    assert_eq!(report.attempts, 2);
    // 10 ms error + 5 s wait + 200 ms + 10 tokens x 10 ms.
    assert_eq!(report.latency_p50, Duration::from_millis(5310));

    // Refused for longer: three attempts, then the call fails with the throttle.
    let scenario = capacity_window(
        0.0,
        100.0,
        5.0,
        "duration_s = 0.5\n[[workload.arrivals]]\nkind = \"bursts\"\nsize = 4",
    );
    let report = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
    assert_eq!(report.attempts, 12);
    assert_eq!(report.failures["throttled_capacity"], 4);

    // A hint over 120 s: the SDK does not retry at all.
    let scenario = capacity_window(
        0.0,
        100.0,
        300.0,
        "duration_s = 0.5\n[[workload.arrivals]]\nkind = \"bursts\"\nsize = 4",
    );
    let report = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
    assert_eq!(report.attempts, 4);
}

#[test]
fn retry_client_is_bounded_by_its_budget() {
    let scenario = capacity_window(
        0.0,
        1000.0,
        1.0,
        "duration_s = 60\n[[workload.arrivals]]\nkind = \"steady\"\nrate_per_s = 10.0",
    );
    let policy = RetryPolicy::default().with_max_attempts(10).unwrap();
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2).unwrap();
    let report = driver::run(&scenario, &mut RetryClient::with_policy(1, policy, budget)).unwrap();
    assert_eq!(report.calls, 600);
    assert_eq!(report.successes, 0);
    // Every call is refused; retries are at most 20 % of calls (plus a window's slack).
    assert!(report.attempts <= 600 + 600 / 5 + 20, "{}", report.attempts);
    assert!(report.attempts > 600);
    assert_eq!(report.failures["throttled_capacity"], 600);
}

#[test]
fn the_report_counts_bursts_blocks_and_targets() {
    let scenario = shipped("seed-403-idle-burst.toml");
    let report = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
    assert!(
        report.max_sent_per_second >= 26,
        "{}",
        report.max_sent_per_second
    );
    assert!(report.blocked > 0);
    assert_eq!(report.failures["blocked"], report.blocked);
    assert_eq!(report.attempts_by_target, [report.attempts]);
}

/// A minimal failover client: the first target, then the second on any failure; shows that the
/// trait is enough to write a router.
struct Failover {
    outbox: Outbox,
}

impl Client for Failover {
    fn on_arrival(&mut self, _now: Duration, call: &Call) {
        self.outbox.send(call.id, 0);
    }

    fn on_response(&mut self, _now: Duration, done: &Done<'_>) {
        let outcome = done.classify().outcome;
        if outcome == Outcome::Success || done.attempt.target == 1 {
            self.outbox.finish(done.attempt.call, outcome);
        } else {
            self.outbox.send(done.attempt.call, 1);
        }
    }

    fn poll(&mut self, now: Duration) -> ClientPoll {
        self.outbox.poll(now)
    }
}

#[test]
fn a_custom_client_fails_over_across_regions() {
    let scenario = shipped("regional-outage.toml");
    let naive = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap();
    let failover = driver::run(
        &scenario,
        &mut Failover {
            outbox: Outbox::new(),
        },
    )
    .unwrap();
    assert!(naive.failed() > 100, "{naive}");
    // Only streams cut mid-way are lost (never retried).
    assert!(failover.failed() < naive.failed() / 2, "{failover}");
    assert!(failover.attempts_by_target[1] > 0);
}

#[test]
fn a_scenario_without_workload_is_an_error_naming_the_field() {
    let scenario = Scenario::from_toml(
        r#"
        [[regions]]
        name = "r"
        [[resources]]
        name = "a"
        region = "r"
        api_key = "k"
        [[resources.deployments]]
        name = "d"
        tpm = 1
        "#,
    )
    .unwrap();
    let e = driver::run(&scenario, &mut NaiveClient::new(1)).unwrap_err();
    assert_eq!(e.field, "workload");
}
