//! Seeded random traffic through every shipped scenario: the model never panics, and every
//! answer keeps the promises clients rely on.

use std::time::{Duration, SystemTime};

use aoai_sim::{Model, Operation, Scenario, SimBody, SimRequest, SimResponse};
use tower_aoai::policy::classify::{Outcome, ThrottleCause, classify_response};

fn random_body(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(..6) {
        0 => (0..rng.usize(..64)).map(|_| rng.u8(..)).collect(),
        1 => b"{}".to_vec(),
        2 => serde_json::json!({
            "messages": [{"role": "user", "content": "x".repeat(rng.usize(..4_000))}],
            "max_tokens": rng.u64(..5_000),
            "n": rng.u64(..4),
            "stream": rng.bool(),
        })
        .to_string()
        .into_bytes(),
        3 => serde_json::json!({
            "model": "gpt-4o",
            "input": "hello",
            "max_output_tokens": rng.u64(..u64::MAX),
            "stream": rng.bool(),
        })
        .to_string()
        .into_bytes(),
        4 => br#"{"prompt":["a","b"],"best_of":1000000,"max_tokens":-1}"#.to_vec(),
        _ => serde_json::json!({
            "messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}],
            "max_completion_tokens": rng.u64(..500),
        })
        .to_string()
        .into_bytes(),
    }
}

#[test]
fn random_traffic_keeps_every_promise() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let scenario = Scenario::load(&path).unwrap();
        let mut model = Model::new(&scenario).unwrap();
        let mut rng = fastrand::Rng::with_seed(scenario.seed);
        let mut now = Duration::ZERO;
        for _ in 0..1_500 {
            now += Duration::from_millis(rng.u64(..400));
            let res = &scenario.resources[rng.usize(..scenario.resources.len())];
            let dep = &res.deployments[rng.usize(..res.deployments.len())];
            let operation = [
                Operation::ChatCompletions,
                Operation::Completions,
                Operation::Embeddings,
                Operation::Responses,
            ][rng.usize(..4)];
            let req = SimRequest {
                resource: if rng.u8(..50) == 0 {
                    "nope".into()
                } else {
                    res.name.clone()
                },
                deployment: rng.bool().then(|| dep.name.clone()),
                operation,
                api_version: None,
                api_key: (rng.u8(..30) != 0).then(|| res.api_key.clone()),
                spillover_deployment: None,
                body: random_body(&mut rng).into(),
            };
            let response = model.handle(now, &req);
            let answer = match &response {
                SimResponse::Answer(a) => a,
                SimResponse::Reset { answer, .. } => answer,
                SimResponse::Refused => continue,
                _ => continue,
            };
            for h in [
                "apim-request-id",
                "x-request-id",
                "x-ms-region",
                "x-ms-deployment-name",
            ] {
                assert!(answer.headers.contains_key(h), "{}: {h}", path.display());
            }
            assert!(answer.timing.total >= answer.timing.first_byte);
            if let SimBody::Stream(chunks) = &answer.body
                && operation != Operation::Responses
            {
                assert!(chunks.last().unwrap().ends_with(b"data: [DONE]\n\n"));
            }
            if answer.status == 429 {
                let class = classify_response(
                    answer.status,
                    &answer.headers,
                    Some(&answer.body.to_bytes()),
                    SystemTime::UNIX_EPOCH,
                );
                assert!(
                    matches!(
                        class.outcome,
                        Outcome::Throttled(
                            ThrottleCause::Quota
                                | ThrottleCause::Capacity
                                | ThrottleCause::Provisioned
                        )
                    ),
                    "{}: {:?}",
                    path.display(),
                    class.outcome
                );
                // A hint always exists: a header, or the body's "retry after N seconds".
                assert!(
                    class.hint.is_some_and(|h| !h.delay.is_zero()),
                    "{}: {:?} {:?}",
                    path.display(),
                    answer.headers,
                    answer.body.to_bytes()
                );
            }
        }
        let stats = model.stats();
        assert_eq!(stats.requests, 1_500);
        assert!(
            stats.by_deployment.len() <= 16,
            "{:?}",
            stats.by_deployment.keys()
        );
    }
}
