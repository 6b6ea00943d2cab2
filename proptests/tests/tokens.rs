//! The token estimate reads a request body in one pass; it must agree with the plain reading of
//! the same body as a JSON tree, for any body.

use proptest::prelude::*;
use serde_json::{Map, Value};
use tower_aoai::policy::TokenEstimator;

/// The estimate as first written: parse the whole body into a `serde_json::Value`, then read it.
/// Slow (it builds the tree) but plainly right; the one-pass estimate must equal it.
fn reference(e: &TokenEstimator, chars_per_token: f64, prompt_share: f64, body: &[u8]) -> u64 {
    let prompt_tokens = |chars: u64| (chars as f64 / chars_per_token * prompt_share).ceil() as u64;
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return prompt_tokens(body.len() as u64) + e.default_completion_tokens();
    };
    let mut chars = 0u64;
    for key in ["messages", "prompt", "input", "instructions", "system"] {
        if let Some(v) = json.get(key) {
            chars = chars.saturating_add(text_chars(v, 0));
        }
    }
    let completion = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| json.get(*k).and_then(Value::as_u64))
        .unwrap_or(e.default_completion_tokens());
    let choices = ["n", "best_of"]
        .iter()
        .filter_map(|k| json.get(*k).and_then(Value::as_u64))
        .max()
        .unwrap_or(1)
        .clamp(1, 128);
    prompt_tokens(chars).saturating_add(completion.saturating_mul(choices))
}

fn text_chars(value: &Value, depth: u32) -> u64 {
    if depth > 16 {
        return 0;
    }
    match value {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items
            .iter()
            .map(|v| text_chars(v, depth + 1))
            .fold(0u64, u64::saturating_add),
        Value::Object(map) => ["content", "text", "input", "output"]
            .iter()
            .filter_map(|k| map.get(*k))
            .map(|v| text_chars(v, depth + 1))
            .fold(0u64, u64::saturating_add),
        _ => 0,
    }
}

const KEYS: [&str; 16] = [
    "messages",
    "prompt",
    "input",
    "instructions",
    "system",
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "content",
    "text",
    "output",
    "role",
    "model",
    "stream",
];

/// JSON values shaped like request bodies: the keys the estimate reads (at any depth), numbers of
/// every kind, strings with escapes and non-ASCII, deep nesting.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..5000).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z \"\\\\\n\u{e9}\u{1F600}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(24, 128, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(&KEYS[..]), inner), 0..6).prop_map(
                |pairs| {
                    let mut map = Map::new();
                    for (k, v) in pairs {
                        map.insert(k.to_string(), v);
                    }
                    Value::Object(map)
                }
            ),
        ]
    })
}

fn estimators() -> impl Strategy<Value = (f64, f64, u64)> {
    (
        prop_oneof![Just(4.0), 0.5f64..8.0],
        prop_oneof![Just(1.0), 0.0f64..10.0],
        0u64..100_000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any JSON body: the one-pass estimate equals the tree reading.
    #[test]
    fn one_pass_equals_the_tree_reading(value in json(), (cpt, share, default) in estimators()) {
        let e = TokenEstimator::new(cpt, share, default).unwrap();
        let body = serde_json::to_vec(&value).unwrap();
        prop_assert_eq!(e.estimate(&body), reference(&e, cpt, share, &body));
    }

    /// Bodies as written by hand: a key given twice (the last one counts), whitespace, and the
    /// body cut or corrupted anywhere (then not JSON: estimated from its length) — still equal.
    #[test]
    fn malformed_and_duplicated_bodies_agree(
        a in json(),
        b in json(),
        key in proptest::sample::select(&KEYS[..]),
        cut in any::<prop::sample::Index>(),
        flip in any::<(prop::sample::Index, u8)>(),
    ) {
        let e = TokenEstimator::default();
        let dup = format!(
            " {{ \"{key}\" : {} , \"{key}\":{} }} ",
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        let bytes = dup.as_bytes();
        prop_assert_eq!(e.estimate(bytes), reference(&e, 4.0, 1.0, bytes));
        let cut = &bytes[..cut.index(bytes.len() + 1)];
        prop_assert_eq!(e.estimate(cut), reference(&e, 4.0, 1.0, cut));
        let mut flipped = bytes.to_vec();
        let i = flip.0.index(flipped.len());
        flipped[i] = flip.1;
        prop_assert_eq!(e.estimate(&flipped), reference(&e, 4.0, 1.0, &flipped));
    }
}
