//! The server's delay hints.
//!
//! Azure OpenAI and OpenAI say how long to wait in several ways, and not all of them on every
//! response: `retry-after-ms` (milliseconds), `retry-after` (integer or decimal seconds, or an HTTP
//! date), `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (plain seconds or durations
//! such as `6s`, `1m30s`, `20ms`, `1h2m3.5s`) and, on Azure, the hyphenated
//! `x-rate-limit-reset-tokens`. Header values come from the network: anything that is not a
//! positive, finite, representable delay (negative, zero, `-1`, garbage, overflow, non-UTF-8) is
//! treated as "no hint" and never panics.
//!
//! Precedence: `retry-after-ms` > `retry-after` > the reset headers (the longest of them).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};

use super::headers;

/// The longest delay a hint may express; a larger value is treated as garbage ("no hint").
///
/// A daily quota says "retry after 86400 seconds", which is honoured (it ends the retries, since it
/// is longer than any deadline); a week or more can only be a broken or hostile header, and the
/// bound keeps arithmetic on hints from overflowing.
pub const MAX_HINT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Header values longer than this are not parsed (a hostile server could send megabytes).
const MAX_VALUE_LEN: usize = 64;

/// Which header (or body text) a delay hint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HintSource {
    /// `retry-after-ms`.
    RetryAfterMs,
    /// `retry-after`, as seconds.
    RetryAfterSeconds,
    /// `retry-after`, as an HTTP date.
    RetryAfterDate,
    /// `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` / `x-rate-limit-reset-tokens`.
    RateLimitReset,
    /// "Please retry after N seconds" in an error body, when no header gave a delay.
    BodyMessage,
}

impl HintSource {
    /// A short stable name, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            HintSource::RetryAfterMs => "retry-after-ms",
            HintSource::RetryAfterSeconds => "retry-after",
            HintSource::RetryAfterDate => "retry-after-date",
            HintSource::RateLimitReset => "x-ratelimit-reset",
            HintSource::BodyMessage => "body",
        }
    }
}

/// A delay the server asked for, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayHint {
    /// How long the server asked the client to wait, at most [`MAX_HINT`].
    pub delay: Duration,
    /// Where the delay was read from.
    pub source: HintSource,
}

/// The reset headers, in the order they are consulted (the longest delay among them wins).
const RESET_HEADERS: [HeaderName; 3] = [
    headers::RESET_REQUESTS,
    headers::RESET_TOKENS,
    headers::RESET_TOKENS_AZURE,
];

/// Reads the server's delay hint from response headers.
///
/// `wall_now` is the current wall-clock time, used only to turn an HTTP-date `retry-after` into a
/// delay. Returns `None` when no header carries a usable (positive) delay.
pub fn delay_hint(headers: &HeaderMap, wall_now: SystemTime) -> Option<DelayHint> {
    if let Some(delay) = headers
        .get(headers::RETRY_AFTER_MS)
        .and_then(|v| parse_retry_after_ms(v.as_bytes()))
    {
        return Some(DelayHint {
            delay,
            source: HintSource::RetryAfterMs,
        });
    }
    if let Some(value) = headers.get(headers::RETRY_AFTER) {
        if let Some(delay) = parse_seconds(value.as_bytes()) {
            return Some(DelayHint {
                delay,
                source: HintSource::RetryAfterSeconds,
            });
        }
        if let Some(delay) = parse_http_date(value.as_bytes(), wall_now) {
            return Some(DelayHint {
                delay,
                source: HintSource::RetryAfterDate,
            });
        }
    }
    RESET_HEADERS
        .iter()
        .filter_map(|name| headers.get(name))
        .filter_map(|v| parse_reset(v.as_bytes()))
        .max()
        .map(|delay| DelayHint {
            delay,
            source: HintSource::RateLimitReset,
        })
}

/// Parses `retry-after-ms`: a positive number of milliseconds (decimals allowed).
pub fn parse_retry_after_ms(value: &[u8]) -> Option<Duration> {
    let ms = parse_positive_number(value)?;
    seconds_to_duration(ms / 1000.0)
}

/// Parses `retry-after` in either form: seconds (integer or decimal) or an HTTP date, which is
/// read relative to `wall_now` (a date in the past is "no hint").
pub fn parse_retry_after(value: &[u8], wall_now: SystemTime) -> Option<Duration> {
    parse_seconds(value).or_else(|| parse_http_date(value, wall_now))
}

/// Parses an `x-ratelimit-reset-*` value: plain seconds (`55`, `0.5`) or a Go-style duration
/// (`6s`, `1m30s`, `20ms`, `1h2m3.5s`, `500us`).
pub fn parse_reset(value: &[u8]) -> Option<Duration> {
    if let Some(d) = parse_seconds(value) {
        return Some(d);
    }
    parse_go_duration(trimmed_str(value)?)
}

fn parse_seconds(value: &[u8]) -> Option<Duration> {
    seconds_to_duration(parse_positive_number(value)?)
}

fn parse_http_date(value: &[u8], wall_now: SystemTime) -> Option<Duration> {
    let text = trimmed_str(value)?;
    let at = httpdate::parse_http_date(text).ok()?;
    let delay = at.duration_since(wall_now).ok()?;
    (!delay.is_zero() && delay <= MAX_HINT).then_some(delay)
}

/// A trimmed, bounded, UTF-8 view of a header value.
fn trimmed_str(value: &[u8]) -> Option<&str> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?.trim();
    (!text.is_empty()).then_some(text)
}

/// A plain decimal number (digits with at most one `.`), strictly positive and finite.
fn parse_positive_number(value: &[u8]) -> Option<f64> {
    let text = trimmed_str(value)?;
    if !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let n: f64 = text.parse().ok()?;
    (n.is_finite() && n > 0.0).then_some(n)
}

fn seconds_to_duration(seconds: f64) -> Option<Duration> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= MAX_HINT.as_secs_f64()) {
        return None;
    }
    let d = Duration::try_from_secs_f64(seconds).ok()?;
    (!d.is_zero()).then_some(d)
}

fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = 0.0f64;
    let mut parts = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
        parts += 1;
        if parts > 8 {
            return None;
        }
    }
    seconds_to_duration(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn now() -> SystemTime {
        httpdate::parse_http_date("Mon, 25 May 2026 18:57:37 GMT").unwrap()
    }

    #[test]
    fn retry_after_ms_wins_over_everything() {
        let h = headers(&[
            ("retry-after-ms", "1500"),
            ("retry-after", "9"),
            ("x-ratelimit-reset-tokens", "30s"),
        ]);
        let hint = delay_hint(&h, now()).unwrap();
        assert_eq!(hint.delay, Duration::from_millis(1500));
        assert_eq!(hint.source, HintSource::RetryAfterMs);
    }

    #[test]
    fn retry_after_seconds_integer_and_decimal() {
        assert_eq!(parse_retry_after(b"6", now()), Some(Duration::from_secs(6)));
        assert_eq!(
            parse_retry_after(b" 0.25 ", now()),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn retry_after_http_date_is_relative_to_now() {
        let h = headers(&[("retry-after", "Mon, 25 May 2026 18:57:47 GMT")]);
        let hint = delay_hint(&h, now()).unwrap();
        assert_eq!(hint.delay, Duration::from_secs(10));
        assert_eq!(hint.source, HintSource::RetryAfterDate);
        // A date in the past is no hint.
        assert_eq!(
            parse_retry_after(b"Mon, 25 May 2026 18:00:00 GMT", now()),
            None
        );
    }

    #[test]
    fn reset_durations() {
        let cases: &[(&[u8], Duration)] = &[
            (b"6s", Duration::from_secs(6)),
            (b"1m30s", Duration::from_secs(90)),
            (b"20ms", Duration::from_millis(20)),
            (b"1h2m3.5s", Duration::from_millis(3_723_500)),
            (b"55", Duration::from_secs(55)),
            (b"0.5", Duration::from_millis(500)),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_reset(text),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn hyphenated_azure_reset_header_is_read() {
        let h = headers(&[("x-rate-limit-reset-tokens", "55")]);
        assert_eq!(
            delay_hint(&h, now()).unwrap().delay,
            Duration::from_secs(55)
        );
    }

    #[test]
    fn the_longest_reset_header_wins() {
        let h = headers(&[
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-reset-tokens", "1m"),
        ]);
        assert_eq!(
            delay_hint(&h, now()).unwrap().delay,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn garbage_is_no_hint() {
        for bad in [
            &b"-1"[..],
            b"0",
            b"0.0",
            b"",
            b"   ",
            b"abc",
            b"1e9",
            b"NaN",
            b"inf",
            b"1..2",
            b"5x",
            b"m",
            b"\xff\xfe",
            b"99999999999999999999999999999999999999999999999999999",
        ] {
            assert_eq!(parse_retry_after_ms(bad), None, "{bad:?}");
            assert_eq!(parse_retry_after(bad, now()), None, "{bad:?}");
            assert_eq!(parse_reset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn overflowing_values_are_no_hint_but_a_daily_quota_is_kept() {
        assert_eq!(parse_retry_after_ms(b"1000000000000000000000"), None);
        assert_eq!(parse_reset(b"99999999h"), None);
        assert_eq!(
            parse_retry_after(b"Fri, 31 Dec 9999 23:59:59 GMT", now()),
            None
        );
        assert_eq!(
            parse_retry_after(b"86400", now()),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn a_bad_ms_header_falls_back_to_retry_after() {
        let h = headers(&[("retry-after-ms", "-1"), ("retry-after", "3")]);
        let hint = delay_hint(&h, now()).unwrap();
        assert_eq!(hint.delay, Duration::from_secs(3));
        assert_eq!(hint.source, HintSource::RetryAfterSeconds);
    }

    #[test]
    fn no_headers_no_hint() {
        assert_eq!(delay_hint(&HeaderMap::new(), now()), None);
    }
}
