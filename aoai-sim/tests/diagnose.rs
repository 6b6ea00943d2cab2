//! The diagnosis names the right cause on scenarios built to produce each cause, with the whole
//! tower-aoai engine as the client (the same engine the Python transports drive), and the shipped
//! seed scenarios are served without the failures their users reported.

use std::path::Path;

use aoai_sim::Scenario;
use aoai_sim::driver::{self, EngineClient, Report};
use tower_aoai::policy::diagnose::{Diagnosis, FindingKind};
use tower_aoai::policy::engine::EngineConfig;
use tower_aoai::policy::pacing::PacingConfig;

fn run(scenario: &Scenario) -> (Report, Diagnosis) {
    run_with(
        scenario,
        EngineConfig {
            seed: Some(7),
            ..EngineConfig::default()
        },
    )
}

fn run_with(scenario: &Scenario, config: EngineConfig) -> (Report, Diagnosis) {
    let mut client = EngineClient::new(scenario, config).unwrap();
    let report = driver::run(scenario, &mut client).unwrap();
    let diagnosis = client.diagnose();
    (report, diagnosis)
}

fn shipped(file: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    Scenario::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One resource in `region` with one deployment, and a steady workload on it.
fn one_deployment(
    region_extra: &str,
    resource_extra: &str,
    deployment: &str,
    rate: f64,
) -> Scenario {
    Scenario::from_toml(&format!(
        r#"
        seed = 1
        [[regions]]
        name = "westeurope"
        latency = {{ first_token_ms = 300, per_token_ms = 5, jitter = 0.0 }}
        {region_extra}
        [[resources]]
        name = "r"
        region = "westeurope"
        api_key = "k"
        {resource_extra}
        [[resources.deployments]]
        {deployment}
        [workload]
        duration_s = 120
        targets = ["r/d"]
        request = {{ prompt_chars = 400, max_tokens = 100 }}
        [[workload.arrivals]]
        kind = "steady"
        rate_per_s = {rate}
        "#
    ))
    .unwrap()
}

fn kinds(d: &Diagnosis) -> Vec<FindingKind> {
    d.kinds()
}

#[test]
fn quota_is_named_when_the_load_exceeds_the_deployments_tpm() {
    // 10 calls/s of ~200 tokens = 120k TPM against a 30k TPM deployment. With the rate-limit
    // headers the engine learns the quota and paces under it (no 429 at all); without learning
    // (a gateway that strips the headers) it meets the quota, and the diagnosis says so.
    let s = one_deployment("", "", "name = \"d\"\ntpm = 30000\nrpm = 6000", 10.0);
    let (paced, _) = run(&s);
    assert_eq!(
        paced.throttles.get("quota").copied().unwrap_or(0),
        0,
        "{paced:?}"
    );
    let config = EngineConfig {
        seed: Some(7),
        pacing: PacingConfig::default().with_learning(false),
        ..EngineConfig::default()
    };
    let (report, d) = run_with(&s, config);
    assert!(
        report.throttles.get("quota").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert_eq!(kinds(&d), vec![FindingKind::Quota], "{d}");
}

#[test]
fn capacity_is_named_when_the_region_is_in_high_demand() {
    let s = one_deployment(
        "capacity = { always = true, max_concurrent = 1, max_per_second = 1, retry_after_s = 1 }",
        "",
        "name = \"d\"\ntpm = 3000000\nrpm = 18000",
        5.0,
    );
    let (report, d) = run(&s);
    assert!(
        report.throttles.get("capacity").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert_eq!(kinds(&d), vec![FindingKind::Capacity], "{d}");
    assert!(d.to_string().contains("still had headroom"), "{d}");
}

#[test]
fn provisioned_is_named_when_the_ptu_is_full() {
    let s = one_deployment(
        "",
        "",
        "name = \"d\"\nkind = \"provisioned\"\ntpm = 20000\nutilization_header = true",
        10.0,
    );
    let (report, d) = run(&s);
    assert!(
        report.throttles.get("provisioned").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert_eq!(kinds(&d), vec![FindingKind::Provisioned], "{d}");
}

#[test]
fn a_block_is_reported_with_its_support_record() {
    // The abuse monitor counts the start as "after idle" and trips on more than 3 requests in the
    // first minute: steady traffic trips it, whatever the client does, and the diagnosis carries
    // the record to quote.
    let s = one_deployment(
        "",
        "abuse = { idle_s = 3600, idle_at_start = true, burst_requests = 3, burst_window_s = 60, block_s = 3600 }",
        "name = \"d\"\ntpm = 3000000\nrpm = 18000",
        1.0,
    );
    let (report, d) = run(&s);
    assert!(report.blocked > 0, "{report:?}");
    let blocked: Vec<_> = d
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Blocked)
        .collect();
    assert!(!blocked.is_empty(), "{d}");
    let record = blocked[0].support_record.as_ref().unwrap();
    assert_eq!(record.resource, "r.sim");
    assert!(record.apim_request_id.is_some());
    assert!(
        record.body.contains("temporarily blocked"),
        "{}",
        record.body
    );
    // After the block, nothing more reached the resource.
    assert_eq!(report.blocked, 1, "{report:?}");
}

#[test]
fn capacity_in_one_region_is_named_as_regional() {
    let (report, d) = run(&shipped("seed-429-regional.toml"));
    assert_eq!(report.successes, report.calls, "{report:?}");
    assert!(kinds(&d).contains(&FindingKind::Capacity), "{d}");
    let capacity = d
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::Capacity)
        .unwrap();
    assert_eq!(capacity.region.as_deref(), Some("eastus2"));
}

#[test]
fn the_idle_then_burst_agent_is_not_blocked() {
    // The seed report: a coding agent idle for half an hour bursts 80 requests and gets its
    // resource blocked. The engine's slow start after idle spreads the burst.
    let (report, d) = run(&shipped("seed-403-idle-burst.toml"));
    assert_eq!(report.blocked, 0, "{report:?}");
    assert_eq!(report.successes, report.calls, "{report:?}");
    assert!(!kinds(&d).contains(&FindingKind::Blocked), "{d}");
}
