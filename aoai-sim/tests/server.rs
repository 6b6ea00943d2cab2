//! The HTTP server, driven by a real HTTP client over 127.0.0.1. Latencies are zero (or
//! compressed with `time_scale`), so nothing waits on a real-time clock.

use std::time::{Duration, Instant, SystemTime};

use aoai_sim::{Scenario, ServeOptions, Server, ServerHandle, Verdict};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tower_aoai::policy::classify::{Outcome, ThrottleCause, classify_response};

const SCENARIO: &str = r#"
[response]
output_tokens = 4

[[regions]]
name = "eastus2"
display_name = "East US 2"
latency = { first_token_ms = 0, per_token_ms = 0, error_ms = 0 }

[[regions]]
name = "swedencentral"
display_name = "Sweden Central"
latency = { first_token_ms = 0, per_token_ms = 0, error_ms = 0 }

[[resources]]
name = "east"
region = "eastus2"
api_key = "key-east"

[[resources.deployments]]
name = "gpt-4o"
tpm = 1000000
rpm = 600
rpm_windows_s = [10]

[[resources.deployments]]
name = "emb"
tpm = 1000000

[[resources]]
name = "sweden"
region = "swedencentral"
api_key = "key-sweden"

[[resources.deployments]]
name = "gpt-4o"
tpm = 1000000
"#;

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Bytes>,
}

impl Reply {
    fn body(&self) -> Bytes {
        Bytes::from(self.frames.concat())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body()).unwrap()
    }
}

/// One request on a fresh connection; `Err` when the connection breaks before or during the
/// answer.
fn send(
    server: &ServerHandle,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    send_method(server, "POST", path, headers, body)
}

fn send_method(
    server: &ServerHandle,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = server.addr();
    rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let (parts, mut body) = res.into_parts();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| format!("body broke after {} frames: {e}", frames.len()))?;
            if let Ok(data) = frame.into_data() {
                frames.push(data);
            }
        }
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            frames,
        })
    })
}

fn start(toml: &str, time_scale: f64) -> ServerHandle {
    Server::start(
        &Scenario::from_toml(toml).unwrap(),
        ServeOptions {
            time_scale,
            ..ServeOptions::default()
        },
    )
    .unwrap()
}

const CHAT: &str = r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":10}"#;

#[test]
fn serves_every_route_with_auth() {
    let server = start(SCENARIO, 1.0);
    let key = [("api-key", "key-east")];
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        &key,
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "sim sim sim sim "
    );
    for h in [
        "apim-request-id",
        "x-request-id",
        "x-ms-region",
        "x-ms-deployment-name",
    ] {
        assert!(r.headers.contains_key(h), "{h}");
    }

    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/completions",
        &key,
        r#"{"prompt":"hi","max_tokens":2}"#,
    )
    .unwrap();
    assert_eq!(r.json()["object"], "text_completion");

    let r = send(
        &server,
        "/r/east/openai/deployments/emb/embeddings",
        &key,
        r#"{"input":["a","b"]}"#,
    )
    .unwrap();
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);

    // v1 and responses: the deployment is the body's `model`; bearer auth.
    let bearer = [("authorization", "Bearer key-east")];
    let r = send(
        &server,
        "/r/east/openai/v1/chat/completions",
        &bearer,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-ms-deployment-name"], "gpt-4o");
    let r = send(
        &server,
        "/r/east/openai/responses?api-version=2025-04-01-preview",
        &key,
        r#"{"model":"gpt-4o","input":"hi"}"#,
    )
    .unwrap();
    assert_eq!(r.json()["object"], "response");
    assert_eq!(r.json()["status"], "completed");

    // Without the /r/ prefix: the first resource.
    let r = send(
        &server,
        "/openai/deployments/gpt-4o/chat/completions",
        &key,
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);

    // Auth and routing errors.
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions",
        &[],
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let wrong = [("api-key", "key-sweden")];
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions",
        &wrong,
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-5/chat/completions",
        &key,
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "DeploymentNotFound");
    let r = send(
        &server,
        "/r/nowhere/openai/deployments/gpt-4o/chat/completions",
        &key,
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(&server, "/elsewhere", &key, CHAT).unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send_method(
        &server,
        "GET",
        "/r/east/openai/v1/chat/completions",
        &key,
        "",
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = send(
        &server,
        "/r/east/openai/v1/chat/completions",
        &key,
        "not json",
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[test]
fn each_resource_has_its_own_base_url_and_region() {
    let server = start(SCENARIO, 1.0);
    let east = server.resource_url("east").unwrap();
    let sweden = server.resource_url("sweden").unwrap();
    assert_eq!(east, format!("http://{}/r/east", server.addr()));
    assert!(server.resource_url("mars").is_none());
    let path = |url: &str| {
        url.strip_prefix(&server.base_url()).unwrap().to_string()
            + "/openai/deployments/gpt-4o/chat/completions"
    };
    let r = send(&server, &path(&east), &[("api-key", "key-east")], CHAT).unwrap();
    assert_eq!(r.headers["x-ms-region"], "East US 2");
    let r = send(&server, &path(&sweden), &[("api-key", "key-sweden")], CHAT).unwrap();
    assert_eq!(r.headers["x-ms-region"], "Sweden Central");
}

#[test]
fn streams_sse_chunks_ending_with_done() {
    let server = start(SCENARIO, 1.0);
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions",
        &[("api-key", "key-east")],
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":10,"stream":true}"#,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = String::from_utf8(r.body().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let mut content = String::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(data).unwrap();
        content.push_str(
            json["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    assert_eq!(content, "sim sim sim sim ");
}

#[test]
fn stream_chunks_are_paced_by_the_scaled_latency_model() {
    // 2 s to first token and 1 s per token, 100x faster: at least 20 ms + 5 x 10 ms.
    let toml = SCENARIO.replacen(
        "latency = { first_token_ms = 0, per_token_ms = 0, error_ms = 0 }",
        "latency = { first_token_ms = 2000, per_token_ms = 1000, error_ms = 0 }",
        1,
    );
    let server = start(&toml, 100.0);
    let started = Instant::now();
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions",
        &[("api-key", "key-east")],
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    )
    .unwrap();
    let elapsed = started.elapsed();
    // A role chunk, 4 tokens, a finish chunk with [DONE]: 6 separate chunks on the wire.
    assert_eq!(r.frames.len(), 6);
    assert!(elapsed >= Duration::from_millis(70), "{elapsed:?}");
}

#[test]
fn throttles_carry_scaled_hints_and_classify_correctly() {
    // 600 RPM over 10 s: 100 per 10 s; the 101st is a call-rate 429.
    let server = start(SCENARIO, 10.0);
    let key = [("api-key", "key-east")];
    let path = "/r/east/openai/deployments/gpt-4o/chat/completions";
    let mut last = None;
    for _ in 0..101 {
        last = Some(send(&server, path, &key, CHAT).unwrap());
    }
    let r = last.unwrap();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let ms: u64 = r.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Virtual 10 s window, 10x faster: at most 1 s of real time.
    assert!(ms > 0 && ms <= 1000, "{ms}");
    let class = classify_response(r.status, &r.headers, Some(&r.body()), SystemTime::now());
    assert_eq!(class.outcome, Outcome::Throttled(ThrottleCause::Quota));
    let stats = server.stats();
    assert_eq!(stats.requests, 101);
    assert_eq!(stats.by_deployment["east/gpt-4o"][&200], 100);
    assert_eq!(stats.by_deployment["east/gpt-4o"][&429], 1);
    assert_eq!(stats.verdict_count(Verdict::CallRate), 1);
    let r = send_method(&server, "GET", "/_sim/stats", &[], "").unwrap();
    assert_eq!(r.json()["by_deployment"]["east/gpt-4o"]["429"], 1);
}

#[test]
fn rate_limit_headers_are_in_real_time() {
    // 1,000,000 TPM and 600 RPM over 10 s windows (100 per 10 s): at twice real time a real
    // minute holds twice the tokens and a real 10 s twice the requests; what is left of the token
    // window is the same count.
    let headers = |k: f64| {
        let server = start(SCENARIO, k);
        let path = "/r/east/openai/deployments/gpt-4o/chat/completions";
        let r = send(&server, path, &[("api-key", "key-east")], CHAT).unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let n = |name: &str| -> u64 { r.headers[name].to_str().unwrap().parse().unwrap() };
        (
            n("x-ratelimit-limit-tokens"),
            n("x-ratelimit-remaining-tokens"),
            n("x-ratelimit-limit-requests"),
            n("x-ratelimit-remaining-requests"),
        )
    };
    let (tokens, tokens_left, requests, requests_left) = headers(1.0);
    assert_eq!((tokens, requests, requests_left), (1_000_000, 100, 99));
    assert!(tokens_left < tokens);
    assert_eq!(headers(2.0), (2_000_000, tokens_left, 200, 199));
}

#[test]
fn outages_refuse_connections_and_reset_streams() {
    let toml = format!(
        "{SCENARIO}\n[[events]]\nkind = \"outage\"\nresource = \"east\"\nmode = \"refuse\"\nstart_s = 0\nend_s = 100000\n\
         [[events]]\nkind = \"outage\"\nresource = \"sweden\"\nmode = \"reset\"\nstart_s = 0\nend_s = 100000\n"
    );
    let server = start(&toml, 1.0);
    let refused = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions",
        &[("api-key", "key-east")],
        CHAT,
    );
    assert!(refused.is_err(), "no response while refused");
    let reset = send(
        &server,
        "/r/sweden/openai/deployments/gpt-4o/chat/completions",
        &[("api-key", "key-sweden")],
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    );
    let err = reset.err().expect("the stream breaks");
    assert!(err.contains("body broke after 3 frames"), "{err}");
    assert_eq!(server.stats().verdict_count(Verdict::Outage), 2);
}

#[test]
fn stop_and_drop_release_the_port() {
    let server = start(SCENARIO, 1.0);
    let addr = server.addr();
    server.stop();
    assert!(std::net::TcpStream::connect(addr).is_err());
    let server = start(SCENARIO, 1.0);
    let addr = server.addr();
    drop(server);
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn bad_options_are_refused() {
    let scenario = Scenario::from_toml(SCENARIO).unwrap();
    for options in [
        ServeOptions {
            time_scale: 0.0,
            ..ServeOptions::default()
        },
        // So slow that the model's delays overflow in real time.
        ServeOptions {
            time_scale: 1e-300,
            ..ServeOptions::default()
        },
        ServeOptions {
            time_scale: f64::NAN,
            ..ServeOptions::default()
        },
        ServeOptions {
            threads: 0,
            ..ServeOptions::default()
        },
    ] {
        assert!(Server::start(&scenario, options).is_err());
    }
    // `serve_scenario` (inside a caller's runtime) checks the scale too, and names it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        aoai_sim::server::serve_scenario(listener, &scenario, 1e-300, async {}).await
    });
    let error = refused.expect_err("a time scale of 1e-300 is refused");
    assert!(error.to_string().contains("time_scale"), "{error}");
}

#[test]
fn hostile_input_gets_an_error_answer_and_the_server_keeps_serving() {
    let server = start(SCENARIO, 1.0);
    let key = [("api-key", "key-east")];
    let paths = [
        "/r/",
        "/r//openai/deployments/gpt-4o/chat/completions",
        "/r/east",
        "/r/east/openai",
        "/r/east/openai/deployments//chat/completions",
        "/r/east/openai/deployments/gpt-4o",
        "/r/east/openai/deployments/gpt-4o/responses",
        "/r/east/openai/v1/",
        "/r/%00/openai/v1/chat/completions",
        "/openai/deployments/gpt-4o/chat/completions/extra",
    ];
    for path in paths {
        let r = send(&server, path, &key, CHAT).unwrap();
        assert!(r.status.is_client_error(), "{path}: {}", r.status);
        for h in [
            "apim-request-id",
            "x-request-id",
            "x-ms-region",
            "x-ms-deployment-name",
        ] {
            assert!(r.headers.contains_key(h), "{path}: {h}");
        }
    }
    let bodies = [
        "",
        "[]",
        "null",
        "{",
        r#"{"messages":"not a list","max_tokens":-5,"n":1e300}"#,
        r#"{"messages":[{"content":{"deep":[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]}}],"max_tokens":18446744073709551615}"#,
        r#"{"model":7,"input":[1,2,3]}"#,
    ];
    for body in bodies {
        let r = send(&server, "/r/east/openai/v1/chat/completions", &key, body).unwrap();
        assert!(
            r.status.is_client_error() || r.status.is_success(),
            "{body}: {}",
            r.status
        );
        let r = send(
            &server,
            "/r/east/openai/deployments/gpt-4o/chat/completions",
            &key,
            body,
        )
        .unwrap();
        assert!(
            r.status.is_client_error() || r.status.is_success(),
            "{body}: {}",
            r.status
        );
    }
    let weird_keys = [
        ("api-key", " "),
        ("authorization", "Bearer"),
        ("authorization", "Basic a2V5"),
    ];
    let long = "k".repeat(8000);
    for (name, value) in weird_keys.into_iter().chain([("api-key", long.as_str())]) {
        let r = send(
            &server,
            "/r/east/openai/v1/chat/completions",
            &[(name, value)],
            CHAT,
        )
        .unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name}: {value}");
    }
    // Still serving.
    let r = send(
        &server,
        "/r/east/openai/deployments/gpt-4o/chat/completions",
        &key,
        CHAT,
    )
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(server.stats().requests > 10);
}
