//! One test per behaviour of the pure model, in virtual time.

use std::time::{Duration, Instant, SystemTime};

use aoai_sim::{Model, Scenario, SimBody, SimRequest, SimResponse, Verdict};
use http::StatusCode;
use tower_aoai::policy::Pacer;
use tower_aoai::policy::classify::{Outcome, ThrottleCause, classify_response};
use tower_aoai::policy::hints::delay_hint;

const KEY: &str = "k";

fn s(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
}

fn model(toml: &str) -> Model {
    Model::new(&Scenario::from_toml(toml).unwrap()).unwrap()
}

/// A chat body whose estimate is `prompt_chars / 4 + max_tokens`.
fn body(prompt_chars: usize, max_tokens: u64, stream: bool) -> Vec<u8> {
    serde_json::json!({
        "messages": [{"role": "user", "content": "x".repeat(prompt_chars)}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
    .into_bytes()
}

fn chat(resource: &str, deployment: &str, body: Vec<u8>) -> SimRequest {
    SimRequest::chat(resource, deployment, KEY, body)
}

fn answer(r: &SimResponse) -> &aoai_sim::Answer {
    r.answer().expect("an HTTP answer")
}

fn outcome(r: &SimResponse) -> Outcome {
    let a = answer(r);
    classify_response(
        a.status,
        &a.headers,
        Some(&a.body.to_bytes()),
        SystemTime::UNIX_EPOCH,
    )
    .outcome
}

fn message(r: &SimResponse) -> String {
    let v: serde_json::Value = serde_json::from_slice(&answer(r).body.to_bytes()).unwrap();
    v["error"]["message"].as_str().unwrap().to_string()
}

fn one_deployment(extra: &str) -> String {
    format!(
        r#"
        [[regions]]
        name = "eastus2"
        display_name = "East US 2"
        latency = {{ first_token_ms = 100, per_token_ms = 10, error_ms = 5 }}
        [[resources]]
        name = "east"
        region = "eastus2"
        api_key = "{KEY}"
        [[resources.deployments]]
        name = "gpt-4o"
        {extra}
        "#
    )
}

#[test]
fn token_quota_is_a_one_minute_window_of_estimates() {
    // Each request is estimated at 400 / 4 + 200 = 300 tokens; 1,000 TPM admits three.
    let mut m = model(&one_deployment("tpm = 1000"));
    let req = chat("east", "gpt-4o", body(400, 200, false));
    for i in 0..3 {
        assert_eq!(
            m.handle(s(i as f64), &req).status(),
            Some(200),
            "request {i}"
        );
    }
    let refused = m.handle(s(10.0), &req);
    assert_eq!(refused.status(), Some(429));
    assert_eq!(answer(&refused).verdict, Verdict::TokenRate);
    assert_eq!(outcome(&refused), Outcome::Throttled(ThrottleCause::Quota));
    assert!(message(&refused).contains("exceeded token rate limit"));
    // The first charge (at 0 s) leaves the window at 60 s: the hint says about 50 s.
    let hint = delay_hint(&answer(&refused).headers, SystemTime::UNIX_EPOCH).unwrap();
    assert!(
        hint.delay >= s(49.0) && hint.delay <= s(51.0),
        "{:?}",
        hint.delay
    );
    assert_eq!(m.handle(s(59.0), &req).status(), Some(429));
    assert_eq!(m.handle(s(60.5), &req).status(), Some(200));
}

#[test]
fn request_quota_is_checked_over_one_second_windows() {
    // 120 RPM over 1 s windows: 2 requests per second, whatever the minute's total.
    let mut m = model(&one_deployment(
        "tpm = 1000000\nrpm = 120\nrpm_windows_s = [1]",
    ));
    let req = chat("east", "gpt-4o", body(4, 1, false));
    assert_eq!(m.handle(s(0.0), &req).status(), Some(200));
    assert_eq!(m.handle(s(0.1), &req).status(), Some(200));
    let third = m.handle(s(0.2), &req);
    assert_eq!(answer(&third).verdict, Verdict::CallRate);
    assert!(message(&third).contains("exceeded call rate limit"));
    assert_eq!(outcome(&third), Outcome::Throttled(ThrottleCause::Quota));
    assert_eq!(m.handle(s(1.05), &req).status(), Some(200));
}

#[test]
fn request_quota_is_checked_over_ten_second_windows() {
    // 60 RPM over 10 s windows: 10 per 10 s; a burst of 12 at a low average gets 2 throttled.
    let mut m = model(&one_deployment(
        "tpm = 1000000\nrpm = 60\nrpm_windows_s = [10]",
    ));
    let req = chat("east", "gpt-4o", body(4, 1, false));
    let statuses: Vec<_> = (0..12)
        .map(|i| m.handle(s(f64::from(i) * 0.05), &req).status())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == Some(200)).count(), 10);
    assert_eq!(statuses[10..], [Some(429), Some(429)]);
    assert_eq!(m.handle(s(9.9), &req).status(), Some(429));
    assert_eq!(m.handle(s(10.1), &req).status(), Some(200));
}

#[test]
fn rpm_per_1000_tpm_ratio_sets_the_request_limit() {
    // o1-like: 1 RPM per 6,000 TPM -> 60,000 TPM = 10 RPM -> 1 per 6 s in a 6 s window... use
    // a 60 s window to see the whole minute.
    let mut m = model(&one_deployment(
        "tpm = 60000\nrpm_per_1000_tpm = 0.16667\nrpm_windows_s = [60]",
    ));
    let req = chat("east", "gpt-4o", body(4, 1, false));
    let ok = (0..15)
        .filter(|i| m.handle(s(f64::from(*i)), &req).status() == Some(200))
        .count();
    assert_eq!(ok, 10);
}

const CAPACITY: &str = r#"
    [[regions]]
    name = "eastus2"
    latency = { first_token_ms = 1000, per_token_ms = 0, error_ms = 5 }
    capacity = { max_concurrent = 2, max_per_second = 1000, retry_after_s = 20 }
    [[regions]]
    name = "swedencentral"
    latency = { first_token_ms = 1000, per_token_ms = 0 }
    [[resources]]
    name = "east"
    region = "eastus2"
    api_key = "k"
    [[resources.deployments]]
    name = "gpt-4o"
    tpm = 10000000
    [[resources]]
    name = "sweden"
    region = "swedencentral"
    api_key = "k"
    [[resources.deployments]]
    name = "gpt-4o"
    tpm = 10000000
    [[events]]
    kind = "high_demand"
    region = "eastus2"
    start_s = 10
    end_s = 20
"#;

#[test]
fn capacity_throttling_follows_concurrent_load_and_the_timeline() {
    let mut m = model(CAPACITY);
    let req = chat("east", "gpt-4o", body(40, 10, false));
    // Before the event: no capacity limit, 5 concurrent requests are fine.
    for i in 0..5 {
        assert_eq!(
            m.handle(s(1.0 + f64::from(i) * 0.01), &req).status(),
            Some(200)
        );
    }
    // During it: 2 in flight is the limit; the third is refused with the peak-load 429.
    assert_eq!(m.handle(s(10.0), &req).status(), Some(200));
    assert_eq!(m.handle(s(10.1), &req).status(), Some(200));
    let refused = m.handle(s(10.2), &req);
    assert_eq!(answer(&refused).verdict, Verdict::Capacity);
    assert_eq!(
        outcome(&refused),
        Outcome::Throttled(ThrottleCause::Capacity)
    );
    assert!(message(&refused).contains("high demand"));
    assert!(message(&refused).contains("Please retry after 20 seconds"));
    // The quota is untouched: another region with the same load is fine.
    let sweden = chat("sweden", "gpt-4o", body(40, 10, false));
    for i in 0..4 {
        assert_eq!(
            m.handle(s(10.3 + f64::from(i) * 0.01), &sweden).status(),
            Some(200)
        );
    }
    // Load is released when answers complete (1 s latency): room again at 11.1 s.
    assert_eq!(m.in_flight("eastus2", s(10.95)), 2);
    assert_eq!(m.in_flight("eastus2", s(11.15)), 0);
    assert_eq!(m.handle(s(11.15), &req).status(), Some(200));
    // After the event: no limit.
    for i in 0..5 {
        assert_eq!(
            m.handle(s(20.0 + f64::from(i) * 0.01), &req).status(),
            Some(200)
        );
    }
}

#[test]
fn capacity_throttling_follows_burstiness() {
    let mut m = model(&CAPACITY.replace(
        "max_concurrent = 2, max_per_second = 1000",
        "max_concurrent = 1000, max_per_second = 3, always = true",
    ));
    let req = chat("east", "gpt-4o", body(40, 10, false));
    let statuses: Vec<_> = (0..5)
        .map(|i| m.handle(s(f64::from(i) * 0.1), &req).status())
        .collect();
    assert_eq!(
        statuses,
        [Some(200), Some(200), Some(200), Some(429), Some(429)]
    );
    // Spread out, the same number of requests passes.
    let mut m = model(&CAPACITY.replace(
        "max_concurrent = 2, max_per_second = 1000",
        "max_concurrent = 1000, max_per_second = 3, always = true",
    ));
    assert!((0..5).all(|i| m.handle(s(f64::from(i) * 0.5), &req).status() == Some(200)));
}

const PTU: &str = r#"
    [[regions]]
    name = "swedencentral"
    latency = { first_token_ms = 100, per_token_ms = 0 }
    [[resources]]
    name = "ptu"
    region = "swedencentral"
    api_key = "k"
    [[resources.deployments]]
    name = "gpt-4o-ptu"
    kind = "provisioned"
    tpm = 6000
    [[resources.deployments]]
    name = "gpt-4o-spill"
    kind = "provisioned"
    tpm = 6000
    spillover_to = "gpt-4o-std"
    [[resources.deployments]]
    name = "gpt-4o-std"
    tpm = 1000000
"#;

#[test]
fn provisioned_fails_fast_with_retry_after_ms_until_under_100_percent() {
    // 6,000 TPM drains 100 tokens/s. Requests are admitted while utilisation is under 100 %.
    let mut m = model(PTU);
    let small = chat("ptu", "gpt-4o-ptu", body(0, 1000, false));
    for i in 0..6 {
        assert_eq!(m.handle(s(0.0), &small).status(), Some(200), "request {i}");
    }
    // Level 6,000: at 100 %, refused until it drains below.
    let refused = m.handle(s(0.0), &small);
    assert_eq!(answer(&refused).verdict, Verdict::Provisioned);
    assert_eq!(m.handle(s(0.5), &small).status(), Some(200));

    // One large request takes the bucket to 7,000 (116.7 %): over 100 % for 10 s.
    let mut m = model(PTU);
    let large = chat("ptu", "gpt-4o-ptu", body(0, 7000, false));
    assert_eq!(m.handle(s(0.0), &large).status(), Some(200));
    let refused = m.handle(s(0.0), &small);
    let a = answer(&refused);
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        outcome(&refused),
        Outcome::Throttled(ThrottleCause::Provisioned)
    );
    assert!(message(&refused).contains("provisioned deployment"));
    assert_eq!(a.headers["retry-after-ms"], "10000");
    assert_eq!(a.headers["azure-openai-deployment-utilization"], "116.7%");
    assert!(a.timing.total <= s(0.1), "fails fast");
    assert_eq!(m.handle(s(9.9), &small).status(), Some(429));
    assert_eq!(m.handle(s(10.1), &small).status(), Some(200));
}

#[test]
fn spillover_serves_from_the_standard_deployment_with_spillover_headers() {
    let mut m = model(PTU);
    let req = chat("ptu", "gpt-4o-spill", body(0, 3000, false));
    let first = m.handle(s(0.0), &req);
    assert_eq!(
        answer(&first).headers["x-ms-deployment-name"],
        "gpt-4o-spill"
    );
    m.handle(s(0.0), &req);
    let spilled = m.handle(s(0.0), &req);
    let a = answer(&spilled);
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.verdict, Verdict::Spilled);
    assert_eq!(a.headers["x-ms-deployment-name"], "gpt-4o-std");
    assert_eq!(a.headers["x-ms-spillover-from-deployment"], "gpt-4o-spill");
    assert_eq!(a.headers["x-ms-spillover-error"], "429");
    assert_eq!(a.headers["x-ms-spillover-from-gpt-4o-spill"], "true");
    // The request header asks for spillover on a PTU deployment without the setting.
    let mut m = model(PTU);
    let mut req = chat("ptu", "gpt-4o-ptu", body(0, 7000, false));
    assert_eq!(m.handle(s(0.0), &req).status(), Some(200));
    assert_eq!(m.handle(s(0.0), &req).status(), Some(429));
    req.spillover_deployment = Some("gpt-4o-std".to_string());
    let spilled = m.handle(s(0.0), &req);
    assert_eq!(
        answer(&spilled).headers["x-ms-deployment-name"],
        "gpt-4o-std"
    );
    assert_eq!(
        m.stats().by_deployment["ptu/gpt-4o-std"].get(&200),
        Some(&1)
    );
}

const ABUSE: &str = r#"
    [[regions]]
    name = "eastus2"
    display_name = "East US 2"
    latency = { first_token_ms = 100, per_token_ms = 0 }
    [[resources]]
    name = "agent"
    region = "eastus2"
    api_key = "k"
    abuse = { idle_s = 600, burst_requests = 5, burst_window_s = 10, block_s = 3600 }
    [[resources.deployments]]
    name = "a"
    tpm = 10000000
    [[resources.deployments]]
    name = "b"
    tpm = 10000000
"#;

#[test]
fn idle_then_burst_blocks_the_whole_resource_until_the_block_expires() {
    let mut m = model(ABUSE);
    let a = chat("agent", "a", body(4, 1, false));
    let b = chat("agent", "b", body(4, 1, false));
    for i in 0..5 {
        assert_eq!(m.handle(s(f64::from(i) * 0.1), &a).status(), Some(200));
    }
    let blocked = m.handle(s(0.6), &a);
    assert_eq!(answer(&blocked).verdict, Verdict::Blocked);
    assert_eq!(outcome(&blocked), Outcome::Blocked);
    assert_eq!(
        answer(&blocked).body.to_bytes(),
        r#"{"error":{"code":"Forbidden","message":"Your resource has been temporarily blocked because we detected unusual behavior."}}"#
    );
    // The whole resource, every deployment, for the whole block.
    assert_eq!(m.handle(s(1.0), &b).status(), Some(403));
    assert_eq!(m.handle(s(3600.0), &b).status(), Some(403));
    // Expired.
    assert_eq!(m.handle(s(3600.7), &b).status(), Some(200));
}

#[test]
fn steady_traffic_after_a_ramp_is_not_blocked() {
    let mut m = model(ABUSE);
    let a = chat("agent", "a", body(4, 1, false));
    // 5 in the first 10 s after idle, then as many as we like: no longer "after idle".
    for i in 0..5 {
        assert_eq!(m.handle(s(f64::from(i) * 2.0), &a).status(), Some(200));
    }
    for i in 0..100 {
        assert_eq!(
            m.handle(s(10.5 + f64::from(i) * 0.01), &a).status(),
            Some(200)
        );
    }
}

const OUTAGE: &str = r#"
    [response]
    output_tokens = 10
    [[regions]]
    name = "westeurope"
    latency = { first_token_ms = 100, per_token_ms = 10 }
    [[regions]]
    name = "swedencentral"
    [[resources]]
    name = "west"
    region = "westeurope"
    api_key = "k"
    [[resources.deployments]]
    name = "gpt-4o"
    tpm = 10000000
    [[resources]]
    name = "sweden"
    region = "swedencentral"
    api_key = "k"
    [[resources.deployments]]
    name = "gpt-4o"
    tpm = 10000000
    [[events]]
    kind = "outage"
    region = "westeurope"
    mode = "refuse"
    start_s = 10
    end_s = 20
    [[events]]
    kind = "outage"
    resource = "west"
    mode = "reset"
    start_s = 20
    end_s = 30
    [[events]]
    kind = "outage"
    region = "westeurope"
    mode = "status"
    status = 500
    start_s = 30
    end_s = 40
"#;

#[test]
fn outages_refuse_reset_and_answer_errors_on_the_timeline() {
    let mut m = model(OUTAGE);
    let west = chat("west", "gpt-4o", body(40, 10, false));
    let west_stream = chat("west", "gpt-4o", body(40, 10, true));
    let sweden = chat("sweden", "gpt-4o", body(40, 10, false));
    assert_eq!(m.handle(s(5.0), &west).status(), Some(200));
    assert_eq!(m.handle(s(10.0), &west), SimResponse::Refused);
    assert_eq!(m.handle(s(15.0), &sweden).status(), Some(200));
    match m.handle(s(25.0), &west_stream) {
        SimResponse::Reset {
            answer,
            after_chunks,
            at,
        } => {
            let SimBody::Stream(chunks) = &answer.body else {
                panic!("a stream")
            };
            assert!(after_chunks > 0 && after_chunks < chunks.len());
            assert!(at > answer.timing.first_byte && at < answer.timing.total);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    assert!(matches!(
        m.handle(s(25.0), &west),
        SimResponse::Reset {
            after_chunks: 0,
            ..
        }
    ));
    let failed = m.handle(s(35.0), &west);
    assert_eq!(failed.status(), Some(500));
    assert_eq!(answer(&failed).verdict, Verdict::Outage);
    assert_eq!(m.handle(s(40.0), &west).status(), Some(200));
}

#[test]
fn throttle_header_variance_is_a_seeded_setting() {
    let throttled = |weights: &str, seed: u64| {
        let mut m = model(&format!(
            "seed = {seed}\n[throttle_headers]\n{weights}\n{}",
            one_deployment("tpm = 100\nrpm = 6000\nrpm_windows_s = [1]")
        ));
        let req = chat("east", "gpt-4o", body(0, 100, false));
        m.handle(s(0.0), &req);
        (0..200)
            .map(|_| answer(&m.handle(s(1.0), &req)).headers.clone())
            .collect::<Vec<_>>()
    };
    // Only "none": no delay header at all, and without limits no limit headers.
    for h in throttled("both = 0\nnone = 1\nlimits = false", 1) {
        for name in [
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-limit-tokens",
        ] {
            assert!(!h.contains_key(name), "{name}");
        }
    }
    // Only the reset headers, as Go durations.
    for h in throttled("both = 0\nreset = 1", 1) {
        assert!(!h.contains_key("retry-after"));
        assert!(
            h["x-ratelimit-reset-tokens"]
                .to_str()
                .unwrap()
                .ends_with("ms")
        );
        assert!(h.contains_key("x-ratelimit-limit-tokens"));
        assert!(h.contains_key("x-ratelimit-remaining-tokens"));
    }
    // A mix: every style shows up, and the same seed gives the same sequence.
    let mix = "both = 1\nretry_after_ms = 1\nretry_after = 1\nreset = 1\nnone = 1";
    let styles = |hs: &[http::HeaderMap]| {
        hs.iter()
            .map(|h| {
                (
                    h.contains_key("retry-after-ms"),
                    h.contains_key("retry-after"),
                    h.contains_key("x-ratelimit-reset-requests"),
                )
            })
            .collect::<Vec<_>>()
    };
    let a = styles(&throttled(mix, 7));
    assert_eq!(a, styles(&throttled(mix, 7)));
    assert_ne!(a, styles(&throttled(mix, 8)));
    for style in [
        (true, true, false),
        (true, false, false),
        (false, true, false),
        (false, false, true),
        (false, false, false),
    ] {
        let n = a.iter().filter(|s| **s == style).count();
        assert!((20..=60).contains(&n), "{style:?} seen {n} times of 200");
    }
}

#[test]
fn every_response_carries_ids_region_and_deployment() {
    let mut m = model(&one_deployment("tpm = 100"));
    let ok = chat("east", "gpt-4o", body(0, 60, false));
    let mut bad_key = ok.clone();
    bad_key.api_key = Some("wrong".into());
    let responses = [
        m.handle(s(0.0), &ok),
        m.handle(s(0.0), &ok),
        m.handle(s(0.0), &chat("east", "nope", body(0, 1, false))),
        m.handle(s(0.0), &bad_key),
    ];
    let statuses: Vec<_> = responses.iter().map(SimResponse::status).collect();
    assert_eq!(statuses, [Some(200), Some(429), Some(404), Some(401)]);
    let mut ids = std::collections::HashSet::new();
    for r in &responses {
        let h = &answer(r).headers;
        let id = h["apim-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
        assert_eq!(h["x-request-id"], id.as_str());
        assert!(ids.insert(id), "ids are unique");
        assert_eq!(h["x-ms-region"], "East US 2");
        assert!(h.contains_key("x-ms-deployment-name"));
    }
    assert_eq!(
        answer(&responses[0]).headers["x-ms-deployment-name"],
        "gpt-4o"
    );
    assert_eq!(
        answer(&responses[0]).headers["x-ratelimit-remaining-tokens"],
        "40"
    );
}

#[test]
fn error_bodies_are_the_real_texts_and_classify_correctly() {
    let mut m = model(&one_deployment("tpm = 100\nrpm = 60\nrpm_windows_s = [1]"));
    let req = chat("east", "gpt-4o", body(0, 100, false));
    m.handle(s(0.0), &req);
    let call_rate = m.handle(s(0.5), &req);
    let token_rate = m.handle(s(1.5), &req);
    assert_eq!(
        message(&call_rate),
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
    );
    assert_eq!(
        message(&token_rate),
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 59 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
    );
    let v: serde_json::Value =
        serde_json::from_slice(&answer(&token_rate).body.to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "429");
    assert_eq!(
        outcome(&call_rate),
        Outcome::Throttled(ThrottleCause::Quota)
    );
    assert_eq!(
        outcome(&token_rate),
        Outcome::Throttled(ThrottleCause::Quota)
    );

    let mut m = model(&CAPACITY.replace("max_concurrent = 2", "max_concurrent = 0, always = true"));
    let peak = m.handle(s(0.0), &chat("east", "gpt-4o", body(4, 1, false)));
    assert_eq!(
        message(&peak),
        "The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load. Please retry after 20 seconds. For improved latency reliability, consider switching to Provisioned Throughput."
    );
    assert_eq!(outcome(&peak), Outcome::Throttled(ThrottleCause::Capacity));

    let mut m = model(PTU);
    let req = chat("ptu", "gpt-4o-ptu", body(0, 7000, false));
    m.handle(s(0.0), &req);
    let ptu = m.handle(s(0.0), &req);
    assert_eq!(
        outcome(&ptu),
        Outcome::Throttled(ThrottleCause::Provisioned)
    );
    // Even without the utilisation header, the default message says "provisioned deployment".
    let mut m = model(&PTU.replacen(
        "tpm = 6000\n",
        "tpm = 6000\n    utilization_header = false\n",
        1,
    ));
    m.handle(s(0.0), &req);
    let ptu = m.handle(s(0.0), &req);
    assert!(
        !answer(&ptu)
            .headers
            .contains_key("azure-openai-deployment-utilization")
    );
    assert_eq!(
        outcome(&ptu),
        Outcome::Throttled(ThrottleCause::Provisioned)
    );
}

#[test]
fn streaming_is_sse_chunks_ending_with_done_paced_by_the_latency_model() {
    let mut m = model(&format!(
        "[response]\noutput_tokens = 5\n{}",
        one_deployment("tpm = 100000")
    ));
    let r = m.handle(s(0.0), &chat("east", "gpt-4o", body(40, 100, true)));
    let a = answer(&r);
    assert_eq!(
        a.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let SimBody::Stream(chunks) = &a.body else {
        panic!("a stream")
    };
    // A role chunk, 5 token chunks, a finish chunk with [DONE].
    assert_eq!(chunks.len(), 7);
    let text = String::from_utf8(a.body.to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 8);
    let mut content = String::new();
    for e in &events[..7] {
        let json: serde_json::Value =
            serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(json["object"], "chat.completion.chunk");
        content.push_str(
            json["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert_eq!(content, "sim sim sim sim sim ");
    assert_eq!(a.timing.first_byte, s(0.1));
    assert_eq!(a.timing.per_chunk, s(0.01));
    assert_eq!(a.timing.total, s(0.16));
    // Not streamed: one JSON body at first token + 5 tokens.
    let r = m.handle(s(0.0), &chat("east", "gpt-4o", body(40, 3, false)));
    let a = answer(&r);
    let json: serde_json::Value = serde_json::from_slice(&a.body.to_bytes()).unwrap();
    assert_eq!(json["choices"][0]["message"]["content"], "sim sim sim ");
    assert_eq!(json["usage"]["completion_tokens"], 3);
    assert_eq!(a.timing.total, s(0.13));
}

#[test]
fn auth_needs_the_resource_key() {
    let mut m = model(&one_deployment("tpm = 100000"));
    let mut req = chat("east", "gpt-4o", body(4, 1, false));
    req.api_key = None;
    let r = m.handle(s(0.0), &req);
    assert_eq!(r.status(), Some(401));
    assert!(message(&r).starts_with("Access denied due to invalid subscription key"));
    req.api_key = Some("other".into());
    assert_eq!(m.handle(s(0.0), &req).status(), Some(401));
    req.api_key = Some(KEY.into());
    assert_eq!(m.handle(s(0.0), &req).status(), Some(200));
    assert_eq!(m.stats().status_count(401), 2);
}

#[test]
fn time_scale_compresses_the_delays_clients_are_told() {
    let mut m = model(&one_deployment(
        "tpm = 1000000\nrpm = 60\nrpm_windows_s = [10]",
    ));
    m.set_time_scale(10.0);
    let req = chat("east", "gpt-4o", body(4, 1, false));
    for _ in 0..10 {
        m.handle(s(0.0), &req);
    }
    let r = m.handle(s(0.0), &req);
    // 10 s of virtual time is 1 s of real time.
    assert_eq!(answer(&r).headers["retry-after-ms"], "1000");
    assert_eq!(answer(&r).headers["retry-after"], "1");
    assert!(message(&r).contains("Please retry after 1 second."));
}

#[test]
fn unrendered_bodies_keep_the_shape_and_timing() {
    let toml = format!(
        "seed = 9\n[response]\noutput_tokens = 7\n{}",
        one_deployment("tpm = 100000")
    );
    for op in [
        aoai_sim::Operation::ChatCompletions,
        aoai_sim::Operation::Completions,
        aoai_sim::Operation::Responses,
    ] {
        let mut req = chat("east", "gpt-4o", body(40, 100, true));
        req.operation = op;
        let rendered = m_handle(&toml, &req, true);
        let bare = m_handle(&toml, &req, false);
        let (SimBody::Stream(a), SimBody::Stream(b)) = (&rendered.body, &bare.body) else {
            panic!("streams")
        };
        assert_eq!(a.len(), b.len(), "{op:?}");
        assert!(b.iter().all(|c| c.is_empty()));
        assert_eq!(rendered.timing, bare.timing);
        assert_eq!(rendered.headers.len(), bare.headers.len());
    }
}

fn m_handle(toml: &str, req: &SimRequest, render: bool) -> aoai_sim::Answer {
    let mut m = model(toml);
    m.set_render_bodies(render);
    answer(&m.handle(s(0.0), req)).clone()
}

#[test]
fn a_deployment_may_have_its_own_default_completion_budget() {
    // No max_tokens: 4 prompt tokens + the deployment's 496 = 500 per request; 1,000 TPM admits 2.
    let mut m = model(&one_deployment(
        "tpm = 1000\ndefault_completion_tokens = 496",
    ));
    let req = chat(
        "east",
        "gpt-4o",
        br#"{"messages":[{"role":"user","content":"0123456789abcdef"}]}"#.to_vec(),
    );
    assert_eq!(m.handle(s(0.0), &req).status(), Some(200));
    assert_eq!(m.handle(s(0.0), &req).status(), Some(200));
    assert_eq!(m.handle(s(0.0), &req).status(), Some(429));
    // The scenario default (1,024) would not even admit one.
    let mut m = model(&one_deployment("tpm = 1000"));
    assert_eq!(m.handle(s(0.0), &req).status(), Some(429));
}

#[test]
fn spillover_header_spelling_is_a_setting() {
    let mut m = model(&PTU.replace(
        "spillover_to = \"gpt-4o-std\"",
        "spillover_to = \"gpt-4o-std\"\n    spillover_header = \"generic\"",
    ));
    let req = chat("ptu", "gpt-4o-spill", body(0, 7000, false));
    m.handle(s(0.0), &req);
    let a = answer(&m.handle(s(0.0), &req)).clone();
    assert_eq!(a.headers["x-ms-spillover-from-deployment"], "gpt-4o-spill");
    assert!(!a.headers.contains_key("x-ms-spillover-from-gpt-4o-spill"));
}

#[test]
fn keys_never_show_in_debug_output() {
    let scenario = Scenario::from_toml(&one_deployment("tpm = 100")).unwrap();
    let mut m = Model::new(&scenario).unwrap();
    let req = chat("east", "gpt-4o", body(0, 1, false));
    m.handle(s(0.0), &req);
    let secret = format!("\"{KEY}\"");
    for text in [
        format!("{scenario:?}"),
        format!("{m:?}"),
        format!("{req:?}"),
    ] {
        assert!(!text.contains(&secret), "{text}");
        assert!(text.contains("redacted") || !text.contains("api_key"));
    }
}

#[test]
fn a_provisioned_deployment_spills_over_while_it_answers_503() {
    let toml = format!(
        "{PTU}\n[[events]]\nkind = \"outage\"\nresource = \"ptu\"\ndeployment = \"gpt-4o-spill\"\nmode = \"status\"\nstatus = 503\nstart_s = 10\nend_s = 20\n\
         [[events]]\nkind = \"outage\"\nresource = \"ptu\"\ndeployment = \"gpt-4o-ptu\"\nmode = \"status\"\nstatus = 503\nstart_s = 10\nend_s = 20\n"
    );
    let mut m = model(&toml);
    let spill = chat("ptu", "gpt-4o-spill", body(0, 10, false));
    let alone = chat("ptu", "gpt-4o-ptu", body(0, 10, false));
    assert_eq!(answer(&m.handle(s(5.0), &spill)).verdict, Verdict::Ok);
    let r = m.handle(s(12.0), &spill);
    let a = answer(&r);
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.verdict, Verdict::Spilled);
    assert_eq!(a.headers["x-ms-spillover-error"], "503");
    assert_eq!(a.headers["x-ms-deployment-name"], "gpt-4o-std");
    // Without a spillover target the 503 reaches the client; other deployments are unaffected.
    assert_eq!(m.handle(s(12.0), &alone).status(), Some(503));
    assert_eq!(
        m.handle(s(12.0), &chat("ptu", "gpt-4o-std", body(0, 10, false)))
            .status(),
        Some(200)
    );
    assert_eq!(m.handle(s(20.0), &alone).status(), Some(200));
}

#[test]
fn a_slow_event_may_target_one_deployment() {
    let toml = format!(
        "{PTU}\n[[events]]\nkind = \"slow\"\nresource = \"ptu\"\ndeployment = \"gpt-4o-std\"\nfactor = 4.0\nstart_s = 0\nend_s = 10\n"
    );
    let mut m = model(&toml);
    let slow = m.handle(s(1.0), &chat("ptu", "gpt-4o-std", body(0, 10, false)));
    let fast = m.handle(s(1.0), &chat("ptu", "gpt-4o-ptu", body(0, 10, false)));
    assert_eq!(answer(&slow).timing.first_byte, s(0.4));
    assert_eq!(answer(&fast).timing.first_byte, s(0.1));
}

#[test]
fn a_request_larger_than_the_context_is_a_400() {
    let mut m = model(&one_deployment(
        "tpm = 100000000\nmax_request_tokens = 1000",
    ));
    let r = m.handle(s(0.0), &chat("east", "gpt-4o", body(0, 1001, false)));
    assert_eq!(r.status(), Some(400));
    let v: serde_json::Value = serde_json::from_slice(&answer(&r).body.to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(
        m.handle(s(0.0), &chat("east", "gpt-4o", body(0, 1000, false)))
            .status(),
        Some(200)
    );
}

#[test]
fn a_request_too_long_for_the_ptu_spills_over_with_a_400_spillover_error() {
    let scenario = PTU
        .replace(
            "name = \"gpt-4o-spill\"\n    kind = \"provisioned\"\n    tpm = 6000",
            "name = \"gpt-4o-spill\"\n    kind = \"provisioned\"\n    tpm = 6000\n    max_request_tokens = 1000",
        )
        .replace(
            "name = \"gpt-4o-ptu\"\n    kind = \"provisioned\"\n    tpm = 6000",
            "name = \"gpt-4o-ptu\"\n    kind = \"provisioned\"\n    tpm = 6000\n    max_request_tokens = 1000",
        );
    let mut m = model(&scenario);
    let long = body(0, 1500, false);
    let spilled = m.handle(s(0.0), &chat("ptu", "gpt-4o-spill", long.clone()));
    let a = answer(&spilled);
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.verdict, Verdict::Spilled);
    assert_eq!(a.headers["x-ms-deployment-name"], "gpt-4o-std");
    assert_eq!(a.headers["x-ms-spillover-error"], "400");
    // Without a spillover target the long request is still a 400.
    assert_eq!(
        m.handle(s(0.0), &chat("ptu", "gpt-4o-ptu", long)).status(),
        Some(400)
    );
}

/// The rate-limit headers of one success and of one throttled request (style `reset`) at time
/// scale `k`: 60 RPM checked over 10 s windows, 1,000 TPM, each request 300 tokens.
fn rate_headers(k: f64, requests_header: &str) -> (http::HeaderMap, http::HeaderMap) {
    let mut m = model(&format!(
        "[throttle_headers]\nboth = 0\nreset = 1\n{}",
        one_deployment(&format!(
            "tpm = 1000\nrpm = 60\nrpm_windows_s = [10]\nrequests_header = \"{requests_header}\""
        ))
    ));
    m.set_time_scale(k);
    let req = chat("east", "gpt-4o", body(400, 200, false));
    let ok = answer(&m.handle(s(0.0), &req)).headers.clone();
    for i in 1..3 {
        assert_eq!(m.handle(s(f64::from(i)), &req).status(), Some(200));
    }
    // The window frees the first 300 tokens at 60 s of virtual time: 50 s from now.
    let refused = m.handle(s(10.0), &req);
    assert_eq!(answer(&refused).verdict, Verdict::TokenRate);
    (ok, answer(&refused).headers.clone())
}

fn header_u64(h: &http::HeaderMap, name: &str) -> u64 {
    h[name].to_str().unwrap().parse().unwrap()
}

fn header_ms(h: &http::HeaderMap, name: &str) -> u64 {
    let v = h[name].to_str().unwrap();
    v.strip_suffix("ms").unwrap().parse().unwrap()
}

#[test]
fn time_scale_reports_rates_per_real_minute_and_durations_in_real_time() {
    // Real time: the scenario's figures as they are.
    let (ok, refused) = rate_headers(1.0, "window");
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-tokens"), 1000);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-tokens"), 700);
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-requests"), 10);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-requests"), 9);
    assert_eq!(header_u64(&refused, "x-ratelimit-limit-tokens"), 1000);
    assert_eq!(header_u64(&refused, "x-ratelimit-remaining-tokens"), 100);
    let reset = header_ms(&refused, "x-ratelimit-reset-tokens");
    assert!((49_000..=50_000).contains(&reset), "{reset}");
    assert_eq!(header_ms(&refused, "x-ratelimit-reset-requests"), reset);

    // Twice as fast: a real minute holds two virtual minutes (twice the tokens, twice the
    // requests per 10 s), every duration is half as long, and what is left of the token window is
    // the same count.
    let (ok, refused) = rate_headers(2.0, "window");
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-tokens"), 2000);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-tokens"), 700);
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-requests"), 20);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-requests"), 19);
    assert_eq!(header_u64(&refused, "x-ratelimit-limit-tokens"), 2000);
    assert_eq!(header_u64(&refused, "x-ratelimit-remaining-tokens"), 100);
    let half = header_ms(&refused, "x-ratelimit-reset-tokens");
    assert!(half.abs_diff(reset / 2) <= 1, "{half} vs {reset} / 2");
    assert_eq!(header_ms(&refused, "x-ratelimit-reset-requests"), half);

    // Requests counted per minute: per real minute.
    let (ok, _) = rate_headers(1.0, "minute");
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-requests"), 60);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-requests"), 59);
    let (ok, refused) = rate_headers(2.0, "minute");
    assert_eq!(header_u64(&ok, "x-ratelimit-limit-requests"), 120);
    assert_eq!(header_u64(&ok, "x-ratelimit-remaining-requests"), 119);
    // Three requests were admitted over the last real minute (the 429 is not counted).
    assert_eq!(header_u64(&refused, "x-ratelimit-remaining-requests"), 117);
}

#[test]
fn time_scale_counts_the_requests_left_over_the_real_window() {
    // 60 RPM over 10 s windows at twice real time: the admission window is 10 virtual seconds
    // (5 real ones) of 10 requests; the headers report 20 requests per 10 real seconds, and what
    // is left of them counts the sends of the last 10 real seconds.
    let mut m = model(&one_deployment(
        "tpm = 1000000\nrpm = 60\nrpm_windows_s = [10]",
    ));
    m.set_time_scale(2.0);
    let req = chat("east", "gpt-4o", body(4, 1, false));
    let first = m.handle(s(0.0), &req);
    assert_eq!(
        header_u64(&answer(&first).headers, "x-ratelimit-remaining-requests"),
        19
    );
    // 15 virtual seconds later (7.5 real): the first send has left the admission window but not
    // the real 10 s one.
    let second = m.handle(s(15.0), &req);
    let h = &answer(&second).headers;
    assert_eq!(header_u64(h, "x-ratelimit-limit-requests"), 20);
    assert_eq!(header_u64(h, "x-ratelimit-remaining-requests"), 18);
    // 10 real seconds after the first, it has left both.
    let third = m.handle(s(20.0), &req);
    assert_eq!(
        header_u64(&answer(&third).headers, "x-ratelimit-remaining-requests"),
        18
    );
    // Admission still counts virtual windows of 10: with the sends at 15 and 20 s, eight more fit.
    for _ in 0..8 {
        assert_eq!(m.handle(s(21.0), &req).status(), Some(200));
    }
    assert_eq!(m.handle(s(21.0), &req).status(), Some(429));
}

/// Paces `calls` requests with tower-aoai's default [`Pacer`] (rates learned from the headers, the
/// request window inferred) against the model at time scale `k`, in the client's real time (the
/// model's clock is `k` times it; answers arrive at once). Returns the pacer, the real time taken
/// and the 429s.
fn pace(toml: &str, k: f64, calls: usize) -> (Pacer, Duration, usize) {
    let mut m = model(toml);
    m.set_time_scale(k);
    let body = body(400, 100, false);
    let tokens = m.estimator().estimate(&body);
    let req = chat("east", "gpt-4o", body);
    let mut pacer = Pacer::default();
    let start = Instant::now();
    let mut now = start;
    let mut throttled = 0;
    for _ in 0..calls {
        while let Err(wait) = pacer.check(now, tokens) {
            now += wait;
        }
        let r = m.handle((now - start).mul_f64(k), &req);
        let h = &answer(&r).headers;
        if r.status() == Some(429) {
            throttled += 1;
            let hint = delay_hint(h, SystemTime::UNIX_EPOCH).map(|d| d.delay);
            pacer.on_throttle(now, outcome(&r), hint);
        }
        pacer.on_response_to(now, now, h);
    }
    (pacer, now - start, throttled)
}

#[test]
fn a_pacer_learns_the_real_time_rates_of_a_scaled_model() {
    for k in [1.0, 2.0] {
        for (window_s, requests_header) in [(1, "window"), (10, "window"), (10, "minute")] {
            // 600 RPM, tokens to spare: the request rate is what binds.
            let toml = one_deployment(&format!(
                "tpm = 100000000\nrpm = 600\nrpm_windows_s = [{window_s}]\n\
                 requests_header = \"{requests_header}\""
            ));
            let (pacer, took, throttled) = pace(&toml, k, 3000);
            let case = format!("k = {k}, {window_s} s, {requests_header}");
            let rpm = pacer.requests_per_minute().unwrap();
            assert!((rpm - 600.0 * k).abs() < 1e-6, "{case}: learned {rpm} RPM");
            let window = if requests_header == "minute" {
                60
            } else {
                window_s
            };
            assert_eq!(
                pacer.request_window(),
                Duration::from_secs(window),
                "{case}"
            );
            assert_eq!(pacer.tokens_per_minute(), Some(100_000_000.0 * k), "{case}");
            // The learned pace is the simulated service's, in real time: 3,000 calls at 600 * k
            // per real minute (at 97 %), within the few 429s of learning.
            let expected = 3000.0 / (600.0 * k * 0.97) * 60.0;
            let took = took.as_secs_f64();
            assert!(
                took < expected * 1.1 && took > expected * 0.8,
                "{case}: {took:.1} s, expected about {expected:.1} s"
            );
            assert!(throttled <= 30, "{case}: {throttled} 429s");
        }
        // 6,000 TPM of 200-token requests, calls to spare: the token rate binds.
        let toml = one_deployment("tpm = 6000\nrpm = 100000\nrpm_windows_s = [1]");
        let (pacer, took, throttled) = pace(&toml, k, 300);
        assert_eq!(pacer.tokens_per_minute(), Some(6000.0 * k), "k = {k}");
        let expected = 300.0 * 200.0 / (6000.0 * k * 0.97) * 60.0;
        let took = took.as_secs_f64();
        assert!(
            took < expected * 1.1 && took > expected * 0.8,
            "k = {k}: {took:.1} s, expected about {expected:.1} s"
        );
        assert!(throttled <= 5, "k = {k}: {throttled} 429s");
    }
}

#[test]
fn extreme_time_scales_answer_without_panicking() {
    // `set_time_scale` takes any finite positive K (the server checks its own range; a library
    // user need not): a real window of K x 10 s or a delay of 50 s / K past `Duration::MAX` is
    // written as the longest there is, not a panic.
    for k in [1e-300, 1e-12, 1e18, 1e300, f64::MAX] {
        let (ok, refused) = rate_headers(k, "window");
        assert!(header_u64(&ok, "x-ratelimit-limit-requests") >= 1, "{k}");
        assert!(
            header_u64(&ok, "x-ratelimit-remaining-requests")
                < header_u64(&ok, "x-ratelimit-limit-requests"),
            "{k}: the request just admitted is counted"
        );
        let reset = header_ms(&refused, "x-ratelimit-reset-tokens");
        if k < 1.0 {
            assert!(reset >= 50_000, "{k}: {reset}");
        } else {
            assert_eq!(reset, 1, "{k}: at least a millisecond");
        }
    }
}
