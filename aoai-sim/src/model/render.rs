//! Success bodies: chat completions, completions, embeddings and responses, plain or SSE.

use bytes::Bytes;
use serde_json::{Value, json};

use super::{Operation, SimBody};

/// What a success body needs to say.
pub(crate) struct Success<'a> {
    pub(crate) op: Operation,
    pub(crate) model: &'a str,
    pub(crate) id: u64,
    pub(crate) created: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) stream: bool,
    /// Number of embedding inputs.
    pub(crate) inputs: usize,
}

const TOKEN: &str = "sim ";

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

pub(crate) fn success(s: &Success<'_>) -> SimBody {
    match (s.op, s.stream) {
        (Operation::Embeddings, _) => SimBody::Full(embeddings(s)),
        (Operation::ChatCompletions, false) => SimBody::Full(chat(s)),
        (Operation::ChatCompletions, true) => SimBody::Stream(chat_stream(s)),
        (Operation::Completions, false) => SimBody::Full(completion(s)),
        (Operation::Completions, true) => SimBody::Stream(completion_stream(s)),
        (Operation::Responses, false) => SimBody::Full(Bytes::from(response(s, true).to_string())),
        (Operation::Responses, true) => SimBody::Stream(response_stream(s)),
    }
}

/// The shape of a success body without its content: empty, or as many empty chunks as the
/// stream would have.
pub(crate) fn placeholder(s: &Success<'_>) -> SimBody {
    if s.stream && s.op != Operation::Embeddings {
        SimBody::Stream(vec![
            Bytes::new();
            usize::try_from(s.output_tokens).unwrap_or(0) + 2
        ])
    } else {
        SimBody::Full(Bytes::new())
    }
}

fn usage(s: &Success<'_>) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.output_tokens,
        "total_tokens": s.prompt_tokens + s.output_tokens,
    })
}

fn text(s: &Success<'_>) -> String {
    TOKEN.repeat(usize::try_from(s.output_tokens).unwrap_or(0))
}

fn chat(s: &Success<'_>) -> Bytes {
    Bytes::from(
        json!({
            "id": format!("chatcmpl-sim{}", s.id),
            "object": "chat.completion",
            "created": s.created,
            "model": s.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text(s), "refusal": null},
                "finish_reason": "stop",
                "logprobs": null,
            }],
            "usage": usage(s),
        })
        .to_string(),
    )
}

fn chat_chunk(s: &Success<'_>, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": format!("chatcmpl-sim{}", s.id),
        "object": "chat.completion.chunk",
        "created": s.created,
        "model": s.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    })
}

fn chat_stream(s: &Success<'_>) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(s.output_tokens as usize + 2);
    chunks.push(sse(&chat_chunk(
        s,
        json!({"role": "assistant", "content": ""}),
        None,
    )));
    // Every token chunk is the same: serialise it once.
    let token = sse(&chat_chunk(s, json!({"content": TOKEN}), None));
    chunks.extend((0..s.output_tokens).map(|_| token.clone()));
    let mut last = format!("data: {}\n\n", chat_chunk(s, json!({}), Some("stop")));
    last.push_str("data: [DONE]\n\n");
    chunks.push(Bytes::from(last));
    chunks
}

fn completion(s: &Success<'_>) -> Bytes {
    Bytes::from(
        json!({
            "id": format!("cmpl-sim{}", s.id),
            "object": "text_completion",
            "created": s.created,
            "model": s.model,
            "choices": [{"index": 0, "text": text(s), "finish_reason": "stop", "logprobs": null}],
            "usage": usage(s),
        })
        .to_string(),
    )
}

fn completion_stream(s: &Success<'_>) -> Vec<Bytes> {
    let chunk = |t: &str, finish: Option<&str>| {
        json!({
            "id": format!("cmpl-sim{}", s.id),
            "object": "text_completion",
            "created": s.created,
            "model": s.model,
            "choices": [{"index": 0, "text": t, "finish_reason": finish, "logprobs": null}],
        })
    };
    let mut chunks = vec![sse(&chunk("", None))];
    let token = sse(&chunk(TOKEN, None));
    chunks.extend((0..s.output_tokens).map(|_| token.clone()));
    chunks.push(Bytes::from(format!(
        "data: {}\n\ndata: [DONE]\n\n",
        chunk("", Some("stop"))
    )));
    chunks
}

fn embeddings(s: &Success<'_>) -> Bytes {
    let data: Vec<Value> = (0..s.inputs.max(1))
        .map(|i| {
            json!({"object": "embedding", "index": i, "embedding": [0.0125, -0.0087, 0.0311, 0.0042]})
        })
        .collect();
    Bytes::from(
        json!({
            "object": "list",
            "data": data,
            "model": s.model,
            "usage": {"prompt_tokens": s.prompt_tokens, "total_tokens": s.prompt_tokens},
        })
        .to_string(),
    )
}

fn response(s: &Success<'_>, done: bool) -> Value {
    let output = if done {
        json!([{
            "type": "message",
            "id": format!("msg_sim{}", s.id),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text(s), "annotations": []}],
        }])
    } else {
        json!([])
    };
    json!({
        "id": format!("resp_sim{}", s.id),
        "object": "response",
        "created_at": s.created,
        "status": if done { "completed" } else { "in_progress" },
        "model": s.model,
        "output": output,
        "usage": if done { json!({
            "input_tokens": s.prompt_tokens,
            "output_tokens": s.output_tokens,
            "total_tokens": s.prompt_tokens + s.output_tokens,
        }) } else { Value::Null },
    })
}

fn response_stream(s: &Success<'_>) -> Vec<Bytes> {
    let event = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq
    };
    let mut chunks = vec![event(
        "response.created",
        json!({"type": "response.created", "sequence_number": next(), "response": response(s, false)}),
    )];
    for _ in 0..s.output_tokens {
        chunks.push(Bytes::from(format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{},\"item_id\":\"msg_sim{}\",\"output_index\":0,\"content_index\":0,\"delta\":\"{TOKEN}\"}}\n\n",
            next(),
            s.id
        )));
    }
    chunks.push(event(
        "response.completed",
        json!({"type": "response.completed", "sequence_number": next(), "response": response(s, true)}),
    ));
    chunks
}
