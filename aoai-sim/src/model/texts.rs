//! The error bodies Azure OpenAI sends (texts from captured responses, see `shared/AZURE.md`).

use serde_json::json;

/// The operation name Azure puts in quota messages.
pub(crate) fn operation_name(op: super::Operation) -> &'static str {
    match op {
        super::Operation::ChatCompletions => "ChatCompletions_Create",
        super::Operation::Completions => "Completions_Create",
        super::Operation::Embeddings => "Embeddings_Create",
        super::Operation::Responses => "Responses_Create",
    }
}

fn error(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message}}).to_string()
}

/// 429, token quota (TPM).
pub(crate) fn token_rate(op: super::Operation, api_version: &str, seconds: u64) -> String {
    error(
        "429",
        &format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {seconds} {}. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.",
            operation_name(op),
            plural(seconds)
        ),
    )
}

/// 429, request quota (RPM over a short window).
pub(crate) fn call_rate(op: super::Operation, api_version: &str, seconds: u64) -> String {
    error(
        "429",
        &format!(
            "Requests to the {} Operation under Azure OpenAI API version {api_version} have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after {seconds} {}. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.",
            operation_name(op),
            plural(seconds)
        ),
    )
}

/// 429, regional capacity ("high demand" / "peak load").
pub(crate) fn peak_load(seconds: u64) -> String {
    error(
        "429",
        &format!(
            "The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load. Please retry after {seconds} {}. For improved latency reliability, consider switching to Provisioned Throughput.",
            plural(seconds)
        ),
    )
}

/// 429, provisioned deployment above 100 % utilisation (message configurable).
pub(crate) fn provisioned(message: &str) -> String {
    error("429", message)
}

/// 403, the abuse-monitoring block.
pub(crate) fn blocked() -> String {
    error(
        "Forbidden",
        "Your resource has been temporarily blocked because we detected unusual behavior.",
    )
}

/// 401, missing or wrong key.
pub(crate) fn unauthorized() -> String {
    error(
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
    )
}

/// 404, unknown deployment.
pub(crate) fn deployment_not_found() -> String {
    error(
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
    )
}

/// 404, unknown resource or path.
pub(crate) fn not_found() -> String {
    error("404", "Resource not found")
}

/// 400, a body that is not a JSON object or names no model.
pub(crate) fn bad_request(message: &str) -> String {
    json!({"error": {"code": "BadRequest", "message": message, "type": "invalid_request_error", "param": null}}).to_string()
}

/// 400, a request larger than the model's context.
pub(crate) fn context_length(limit: u64, tokens: u64) -> String {
    json!({"error": {
        "code": "context_length_exceeded",
        "message": format!("This model's maximum context length is {limit} tokens. However, you requested {tokens} tokens. Please reduce the length of the messages or completion."),
        "type": "invalid_request_error",
        "param": "messages",
    }})
    .to_string()
}

/// 5xx during an outage.
pub(crate) fn server_error(status: u16) -> String {
    if status == 503 {
        error(
            "ServiceUnavailable",
            "The service is temporarily unable to process your request. Please try again later.",
        )
    } else {
        error(
            "InternalServerError",
            "The server had an error while processing your request. Sorry about that!",
        )
    }
}

fn plural(seconds: u64) -> &'static str {
    if seconds == 1 { "second" } else { "seconds" }
}
