//! The token estimate of a request, made the way Azure OpenAI makes it when the request arrives.
//!
//! Azure counts a request against the deployment's tokens-per-minute quota *before* running it,
//! from an estimate: the prompt (estimated from its character count) plus the completion budget,
//! `max_tokens` (or `max_completion_tokens` / `max_output_tokens`) times `n` / `best_of`. The
//! limiter paces on this estimate and the simulator charges it, so both use this one function.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::ConfigError;

/// Bodies larger than this are not parsed; their estimate is made from their length alone.
const MAX_PARSED_BODY: usize = 8 * 1024 * 1024;

/// Estimates the tokens a request will be charged for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenEstimator {
    chars_per_token: f64,
    prompt_share: f64,
    default_completion_tokens: u64,
}

impl Default for TokenEstimator {
    /// 4 characters per token, the whole prompt counted, 1,024 completion tokens when the request
    /// sets no limit.
    fn default() -> Self {
        Self {
            chars_per_token: 4.0,
            prompt_share: 1.0,
            default_completion_tokens: 1024,
        }
    }
}

impl TokenEstimator {
    /// An estimator with explicit settings.
    pub fn new(
        chars_per_token: f64,
        prompt_share: f64,
        default_completion_tokens: u64,
    ) -> Result<Self, ConfigError> {
        if !(chars_per_token.is_finite() && chars_per_token > 0.0) {
            return Err(ConfigError::new(
                "tokens.chars_per_token",
                format!("must be a positive number, got {chars_per_token}"),
            ));
        }
        if !(0.0..=10.0).contains(&prompt_share) {
            return Err(ConfigError::new(
                "tokens.prompt_share",
                format!("must be between 0 and 10, got {prompt_share}"),
            ));
        }
        Ok(Self {
            chars_per_token,
            prompt_share,
            default_completion_tokens,
        })
    }

    /// The completion budget assumed when a request sets none.
    pub fn default_completion_tokens(&self) -> u64 {
        self.default_completion_tokens
    }

    /// The estimated tokens of a request with this JSON body. A body that is not JSON (or is too
    /// large to parse) is estimated from its length plus the default completion budget.
    ///
    /// The body is read in one pass without building a JSON tree: only the prompt's characters and
    /// the few numbers the estimate needs are kept (this runs for every attempt the limiter paces).
    pub fn estimate(&self, body: &[u8]) -> u64 {
        let parsed = (body.len() <= MAX_PARSED_BODY)
            .then(|| std::str::from_utf8(body).ok())
            .flatten()
            // Checked as UTF-8 whole first: the one-pass reader skips the strings it ignores
            // without checking them, and a body that is not UTF-8 is not JSON.
            .and_then(|text| serde_json::from_str::<Summary>(text).ok());
        let Some(summary) = parsed else {
            return self.prompt_tokens(body.len() as u64) + self.default_completion_tokens;
        };
        let chars = summary
            .prompt_chars
            .iter()
            .copied()
            .fold(0u64, u64::saturating_add);
        let completion = summary
            .completion
            .iter()
            .find_map(|n| *n)
            .unwrap_or(self.default_completion_tokens);
        let choices = summary
            .choices
            .iter()
            .filter_map(|n| *n)
            .max()
            .unwrap_or(1)
            .clamp(1, 128);
        self.prompt_tokens(chars)
            .saturating_add(completion.saturating_mul(choices))
    }

    fn prompt_tokens(&self, chars: u64) -> u64 {
        (chars as f64 / self.chars_per_token * self.prompt_share).ceil() as u64
    }
}

/// What the estimate needs from a request body. As with a JSON object, a key given twice counts
/// once, with its last value; a body that is JSON but not an object has none of these.
#[derive(Debug, Default)]
struct Summary {
    /// Characters of text under `messages`, `prompt`, `input`, `instructions`, `system`.
    prompt_chars: [u64; 5],
    /// `max_completion_tokens`, `max_tokens`, `max_output_tokens`, first found wins in this order.
    completion: [Option<u64>; 3],
    /// `n`, `best_of`: the larger counts.
    choices: [Option<u64>; 2],
}

/// A top-level key of a request body the estimate reads.
enum Key {
    Prompt(usize),
    Completion(usize),
    Choices(usize),
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "messages" => Key::Prompt(0),
                    "prompt" => Key::Prompt(1),
                    "input" => Key::Prompt(2),
                    "instructions" => Key::Prompt(3),
                    "system" => Key::Prompt(4),
                    "max_completion_tokens" => Key::Completion(0),
                    "max_tokens" => Key::Completion(1),
                    "max_output_tokens" => Key::Completion(2),
                    "n" => Key::Choices(0),
                    "best_of" => Key::Choices(1),
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Summary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Summary;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Summary, A::Error> {
                let mut s = Summary::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Prompt(i) => s.prompt_chars[i] = map.next_value_seed(TextChars(0))?,
                        Key::Completion(i) => s.completion[i] = map.next_value::<Count>()?.0,
                        Key::Choices(i) => s.choices[i] = map.next_value::<Count>()?.0,
                        Key::Other => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(s)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Summary, A::Error> {
                Skip.visit_seq(seq).map(|_| Summary::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Summary, E> {
                Ok(Summary::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Summary, E> {
                Ok(Summary::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Summary, E> {
                Ok(Summary::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Summary, E> {
                Ok(Summary::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Summary, E> {
                Ok(Summary::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Summary, E> {
                Ok(Summary::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// A non-negative integer, or `None` for any other value (a float, a negative number, a string).
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(n).ok()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                Skip.visit_seq(seq).map(|_| Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                Skip.visit_map(map).map(|_| Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value the estimate does not need, read through as strictly as a JSON tree would be (a number
/// out of range is an error, as it is for `serde_json::Value`), but kept nowhere. (`IgnoredAny`
/// skips numbers without reading them, so it would take a body `Value` rejects.)
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// Characters of text in a prompt value, at this nesting depth: strings, and the `content` /
/// `text` / `input` / `output` of messages and parts. Deeper than 16 levels counts nothing.
#[derive(Clone, Copy)]
struct TextChars(u32);

/// A key of a message or part whose value holds text.
struct TextKey(Option<usize>);

impl<'de> Deserialize<'de> for TextKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TextKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<TextKey, E> {
                Ok(TextKey(match key {
                    "content" => Some(0),
                    "text" => Some(1),
                    "input" => Some(2),
                    "output" => Some(3),
                    _ => None,
                }))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> DeserializeSeed<'de> for TextChars {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        if self.0 > 16 {
            return Skip::deserialize(d).map(|_| 0);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextChars {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
        Ok(s.chars().count() as u64)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut total = 0u64;
        while let Some(n) = seq.next_element_seed(TextChars(self.0 + 1))? {
            total = total.saturating_add(n);
        }
        Ok(total)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut parts = [0u64; 4];
        while let Some(key) = map.next_key::<TextKey>()? {
            match key.0 {
                Some(i) => parts[i] = map.next_value_seed(TextChars(self.0 + 1))?,
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(parts.iter().copied().fold(0u64, u64::saturating_add))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(0)
    }
    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_counts_prompt_and_completion_budget() {
        let e = TokenEstimator::default();
        // 40 characters of prompt = 10 tokens, plus 100 * n=2.
        let body = br#"{"messages":[{"role":"user","content":"0123456789012345678901234567890123456789"}],"max_tokens":100,"n":2}"#;
        assert_eq!(e.estimate(body), 10 + 200);
    }

    #[test]
    fn content_parts_and_best_of() {
        let e = TokenEstimator::default();
        let body = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"text","text":"efgh"}]}],"max_completion_tokens":10,"best_of":3,"n":1}"#;
        assert_eq!(e.estimate(body), 2 + 30);
    }

    #[test]
    fn missing_limit_uses_the_default_budget() {
        let e = TokenEstimator::new(4.0, 1.0, 500).unwrap();
        assert_eq!(e.estimate(br#"{"input":"abcdefgh"}"#), 2 + 500);
    }

    #[test]
    fn prompt_share_scales_the_prompt_only() {
        let e = TokenEstimator::new(4.0, 0.5, 0).unwrap();
        assert_eq!(
            e.estimate(br#"{"prompt":"abcdefgh","max_tokens":7}"#),
            1 + 7
        );
    }

    #[test]
    fn non_json_is_estimated_from_its_length() {
        let e = TokenEstimator::new(4.0, 1.0, 0).unwrap();
        assert_eq!(e.estimate(b"not json at all!"), 4);
    }

    #[test]
    fn bad_settings_name_the_field() {
        assert_eq!(
            TokenEstimator::new(0.0, 1.0, 1).unwrap_err().field(),
            "tokens.chars_per_token"
        );
        assert_eq!(
            TokenEstimator::new(4.0, -1.0, 1).unwrap_err().field(),
            "tokens.prompt_share"
        );
    }
}
