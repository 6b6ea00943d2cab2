//! The token estimate of a request, made the way Azure OpenAI makes it when the request arrives.
//!
//! Azure counts a request against the deployment's tokens-per-minute quota *before* running it,
//! from an estimate: the prompt (estimated from its character count) plus the completion budget,
//! `max_tokens` (or `max_completion_tokens` / `max_output_tokens`) times `n` / `best_of`. The
//! limiter paces on this estimate and the simulator charges it, so both use this one function.

use serde_json::Value;

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
    pub fn estimate(&self, body: &[u8]) -> u64 {
        let parsed = (body.len() <= MAX_PARSED_BODY)
            .then(|| serde_json::from_slice::<Value>(body).ok())
            .flatten();
        let Some(json) = parsed else {
            return self.prompt_tokens(body.len() as u64) + self.default_completion_tokens;
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
            .unwrap_or(self.default_completion_tokens);
        let choices = ["n", "best_of"]
            .iter()
            .filter_map(|k| json.get(*k).and_then(Value::as_u64))
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

/// Characters of text in a prompt value: strings, and the `content` / `text` of messages and parts.
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
