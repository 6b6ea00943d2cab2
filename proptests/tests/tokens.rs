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

/// Numbers as written by hand, many at the edges: `u64`/`i64` limits, the `f64` overflow bound
/// (where `serde_json`'s own inexact bound decides), huge and tiny exponents.
const EDGE_NUMBERS: [&str; 29] = [
    "0",
    "-0",
    "-0.0",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999",
    "-9223372036854775808",
    "-9223372036854775809",
    "1e308",
    "1.7976931348623157e308",
    "1.7976931348623158e308",
    "1.7976931348623159e308",
    "1.8e308",
    "17976931348623157e292",
    "17976931348623159e292",
    "1e309",
    "-1e309",
    "1e400",
    "0e400",
    "0e4000000000000",
    "1e4000000000000",
    "1e-4000000000000",
    "1e-400",
    "4.9e-324",
    "0.1e310",
    "100000000000000000000000000000e280",
    "1E2",
    "1e+2",
    "-1.5E-3",
];

fn number_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        16 => (0u64..5000).prop_map(|n| n.to_string().into_bytes()),
        2 => proptest::sample::select(&EDGE_NUMBERS[..]).prop_map(|s| s.as_bytes().to_vec()),
        4 => (
            "-?",
            "(0|[1-9][0-9]{0,24})",
            "(\\.[0-9]{1,20})?",
            "([eE][+-]?[0-9]{1,3})?",
        )
            .prop_map(|(a, b, c, d)| format!("{a}{b}{c}{d}").into_bytes()),
        1 => (298usize..312, "(\\.[0-9])?", "(e-?[0-9])?")
            .prop_map(|(n, f, e)| format!("{}{f}{e}", "9".repeat(n)).into_bytes()),
    ]
}

/// Pieces of a string's raw text: plain, non-ASCII, every escape, surrogate pairs.
fn string_piece() -> impl Strategy<Value = Vec<u8>> {
    const ESCAPES: [&[u8]; 15] = [
        b"\\\"",
        b"\\\\",
        b"\\/",
        b"\\b",
        b"\\f",
        b"\\n",
        b"\\r",
        b"\\t",
        b"\\ud83d\\ude00",
        b"\\uD83D\\uDE00",
        b"\\udbff\\udfff",
        b"\\u00e9",
        b"\\u0000",
        b"\\uFFFF",
        b"\x7f\xef\xbb\xbf",
    ];
    prop_oneof![
        12 => "[a-z ]{1,5}".prop_map(String::into_bytes),
        6 => "[\u{e9}\u{1F600}\u{65e5}\u{2028}]{1,3}".prop_map(String::into_bytes),
        3 => "\\\\u[0-9a-fA-F]{4}".prop_map(String::into_bytes),
        8 => proptest::sample::select(&ESCAPES[..]).prop_map(<[u8]>::to_vec),
    ]
}

fn string_text() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(string_piece(), 0..6).prop_map(|pieces| {
        let mut s = vec![b'"'];
        s.extend(pieces.concat());
        s.push(b'"');
        s
    })
}

/// Keys, known ones escaped too (`max\u005ftokens` is `max_tokens`).
fn key_text() -> impl Strategy<Value = Vec<u8>> {
    const ESCAPED: [&str; 12] = [
        "max\\u005ftokens",
        "\\u006e",
        "m\\u0065ssages",
        "\\u0070rompt",
        "cont\\u0065nt",
        "te\\u0078t",
        "best\\u005Fof",
        "max_completion_tokens\\u0000",
        "\\u006dax_completion_tokens",
        "\\ud83d\\ude00",
        "input\\/",
        "n\\u0000",
    ];
    prop_oneof![
        12 => proptest::sample::select(&KEYS[..]).prop_map(|k| format!("\"{k}\"").into_bytes()),
        4 => proptest::sample::select(&ESCAPED[..]).prop_map(|k| format!("\"{k}\"").into_bytes()),
        2 => string_text(),
    ]
}

/// Whitespace between tokens: JSON's four.
fn ws() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => "[ \t\n\r]{1,3}".prop_map(String::into_bytes),
    ]
}

/// JSON text written by hand rather than by `serde_json`: edge numbers (some out of range),
/// escapes, surrogate pairs, non-ASCII, whitespace, escaped keys.
fn raw_json() -> BoxedStrategy<Vec<u8>> {
    let leaf = prop_oneof![
        3 => number_text(),
        5 => string_text(),
        1 => proptest::sample::select(&["true", "false", "null", "[]", "{}"][..])
            .prop_map(|s| s.as_bytes().to_vec()),
    ];
    leaf.prop_recursive(8, 48, 5, |inner| {
        prop_oneof![
            proptest::collection::vec((ws(), inner.clone(), ws()), 0..5).prop_map(|items| {
                let mut s = b"[".to_vec();
                for (i, (a, v, b)) in items.iter().enumerate() {
                    if i > 0 {
                        s.push(b',');
                    }
                    s.extend([&a[..], v, b].concat());
                }
                s.push(b']');
                s
            }),
            members(inner).prop_map(|mut s| {
                s.push(b'}');
                s
            }),
        ]
    })
    .boxed()
}

/// An object's opening brace and members, without its closing brace.
fn members(value: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((ws(), key_text(), ws(), value, ws()), 0..6).prop_map(|members| {
        let mut s = b"{".to_vec();
        for (i, (a, key, b, v, c)) in members.iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            s.extend([&a[..], key, b, b":", v, c].concat());
        }
        s
    })
}

/// A whole body: mostly a request-like object (numbers and strings as values more often at the
/// top, where the counts and prompts are read), with whitespace around.
fn raw_body() -> impl Strategy<Value = Vec<u8>> {
    let top = prop_oneof![
        3 => members(
            prop_oneof![2 => raw_json(), 1 => number_text(), 1 => string_text()].boxed()
        )
        .prop_map(|mut s| {
            s.push(b'}');
            s
        }),
        1 => raw_json(),
    ];
    (ws(), top, ws()).prop_map(|(a, v, b)| [a, v, b].concat())
}

/// One flaw to put in a body: what a JSON string may not hold (lone or mismatched surrogates, bad
/// escapes, raw control characters, bytes that are not UTF-8), a malformed number or literal,
/// whitespace JSON does not allow, a stray separator or bracket.
fn flaw() -> impl Strategy<Value = Vec<u8>> {
    const IN_STRINGS: [&[u8]; 20] = [
        b"\\ud83d",
        b"\\ude00",
        b"\\ud83d\\u0041",
        b"\\ud83d\\ud83d\\ude00",
        b"\\ud83d\\n",
        b"\\ud83d\\",
        b"\\u12",
        b"\\u12g4",
        b"\\x",
        b"\\U0041",
        b"\\",
        b"\x00",
        b"\x1f",
        b"\t",
        b"\n",
        b"\x80",
        b"\xc3",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xc0\x80",
    ];
    const OTHER: [&str; 30] = [
        "01", "00", "1.", ".5", "-", "+1", "1e", "1e+", "--1", "1.2.3", "0x10", "Infinity", "NaN",
        "-01", "1.e5", "\u{c}", "\u{b}", "\u{a0}", "\u{feff}", ",", ";", ":", "::", "]", "}", "\"",
        "tru", "nul", "True", "x",
    ];
    prop_oneof![
        proptest::sample::select(&IN_STRINGS[..]).prop_map(<[u8]>::to_vec),
        proptest::sample::select(&OTHER[..]).prop_map(|s| s.as_bytes().to_vec()),
    ]
}

/// The bytes of tiny bodies: JSON's punctuation, digits, letters of literals and escapes,
/// whitespace, control characters, and the bytes of `é` and of no character.
const TINY: [u8; 26] = [
    b'"', b'\\', b'{', b'}', b'[', b']', b':', b',', b'0', b'1', b'-', b'.', b'e', b'n', b'u',
    b'l', b't', b'a', b' ', b'\n', 0x1f, 0x7f, 0xc3, 0xa9, 0x80, 0xff,
];

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

    /// Bodies written by hand (escapes, surrogate pairs, non-ASCII, numbers at the edges,
    /// whitespace, escaped keys): equal.
    #[test]
    fn hand_written_bodies_agree(body in raw_body(), (cpt, share, default) in estimators()) {
        let e = TokenEstimator::new(cpt, share, default).unwrap();
        prop_assert_eq!(e.estimate(&body), reference(&e, cpt, share, &body));
    }

    /// The same bodies with one flaw put in after a quote, colon, comma or bracket, or at either
    /// end: mostly not JSON any more, and then estimated from their length the same way.
    #[test]
    fn one_flaw_agrees(body in raw_body(), flaw in flaw(), at in any::<prop::sample::Index>()) {
        let e = TokenEstimator::default();
        let spots: Vec<usize> = body
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b, b'"' | b':' | b',' | b'[' | b'{'))
            .map(|(i, _)| i + 1)
            .chain([0, body.len()])
            .collect();
        let at = spots[at.index(spots.len())];
        let flawed = [&body[..at], &flaw, &body[at..]].concat();
        prop_assert_eq!(e.estimate(&flawed), reference(&e, 4.0, 1.0, &flawed));
    }

    /// Nesting around the depth where prompt text stops counting (16 levels) and around
    /// serde_json's recursion limit (128 arrays/objects is too deep for it), with prompt text at
    /// the bottom: counted or not, accepted or rejected, the same way.
    #[test]
    fn deep_nesting_agrees(
        depth in prop_oneof![10usize..24, 110usize..140],
        objects in proptest::collection::vec(any::<bool>(), 140),
        key in proptest::sample::select(&["messages", "input", "model"][..]),
        inner_key in proptest::sample::select(&["content", "text", "role"][..]),
    ) {
        let e = TokenEstimator::default();
        let mut body = format!("{{\"{key}\":");
        for &object in &objects[..depth] {
            body.push_str(if object { "{\"\":0,\"" } else { "[" });
            if object {
                body.push_str(inner_key);
                body.push_str("\":");
            }
        }
        body.push_str("\"hello, world\"");
        for &object in objects[..depth].iter().rev() {
            body.push(if object { '}' } else { ']' });
        }
        body.push_str(",\"max_tokens\":3}");
        prop_assert_eq!(e.estimate(body.as_bytes()), reference(&e, 4.0, 1.0, body.as_bytes()));
    }

    /// Tiny bodies from the bytes that matter, bare or as a string (all of them read within
    /// eight bytes of the end, where strings are scanned byte by byte): equal.
    #[test]
    fn tiny_bodies_agree(
        bytes in proptest::collection::vec(proptest::sample::select(&TINY[..]), 0..10),
        quoted in any::<bool>(),
    ) {
        let e = TokenEstimator::default();
        let body = if quoted { [&b"\""[..], &bytes, b"\""].concat() } else { bytes };
        prop_assert_eq!(e.estimate(&body), reference(&e, 4.0, 1.0, &body));
    }
}
