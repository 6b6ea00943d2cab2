//! Why was I throttled, how close am I, what do I send to support — answered from what the client
//! saw.
//!
//! [`diagnose`] reads a [`Stats`] snapshot and names, per backend and region, whether throttling
//! is quota-, capacity- or provisioned-related, whether it is concentrated in one region, and how
//! much headroom the rate-limit headers reported before the throttles; each 403 block comes with
//! the record to quote in a support request. Every finding carries the figures it is based on.

use std::fmt::{self, Write as _};

use super::classify::ThrottleCause;
use super::route::blocked::SupportRecord;
use super::stats::{BackendStats, Stats};

/// A throttle cause must account for at least this share of a backend's 429s to be named as *the*
/// cause; below it the finding says the causes are mixed.
const DOMINANT_SHARE: f64 = 0.6;
/// A region is "the" throttled region when its throttle rate is at least this many times the
/// next-best region's, and at least [`REGION_MIN_RATE`].
const REGION_RATIO: f64 = 3.0;
const REGION_MIN_RATE: f64 = 0.05;

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FindingKind {
    /// The deployment's own TPM/RPM quota.
    Quota,
    /// Regional capacity ("high demand" / "peak load"), independent of quota.
    Capacity,
    /// A provisioned deployment at 100 % utilisation.
    Provisioned,
    /// 429s that said nothing about their cause, or a mix of causes.
    Unclear,
    /// Throttling concentrated in one region while others serve.
    Region,
    /// A 403 "temporarily blocked" on a resource.
    Blocked,
}

impl FindingKind {
    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Quota => "quota",
            FindingKind::Capacity => "capacity",
            FindingKind::Provisioned => "provisioned",
            FindingKind::Unclear => "unclear",
            FindingKind::Region => "region",
            FindingKind::Blocked => "blocked",
        }
    }
}

/// One conclusion, where it applies, the figures it rests on, and what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// What the finding is about.
    pub kind: FindingKind,
    /// The backend it concerns, if one.
    pub backend: Option<String>,
    /// The region it concerns, if known.
    pub region: Option<String>,
    /// One sentence.
    pub summary: String,
    /// The figures, as (name, value) pairs.
    pub evidence: Vec<(String, String)>,
    /// What to do about it.
    pub advice: String,
    /// For a block: the support record.
    pub support_record: Option<SupportRecord>,
}

/// The diagnosis: findings, most important first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diagnosis {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Diagnosis {
    /// Whether anything was found.
    pub fn is_empty(&self) -> bool {
        self.findings.is_empty()
    }

    /// The finding kinds, in order.
    pub fn kinds(&self) -> Vec<FindingKind> {
        self.findings.iter().map(|f| f.kind).collect()
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.findings.is_empty() {
            return f.write_str("No throttling or blocks observed.");
        }
        for (i, finding) in self.findings.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "[{}] {}", finding.kind.as_str(), finding.summary)?;
            for (k, v) in &finding.evidence {
                write!(f, "\n    {k}: {v}")?;
            }
            write!(f, "\n  -> {}", finding.advice)?;
            if let Some(record) = &finding.support_record {
                write!(f, "\n  support request:\n")?;
                for line in record.to_string().lines() {
                    writeln!(f, "    {line}")?;
                }
            }
        }
        Ok(())
    }
}

/// Diagnoses throttling and blocks from the statistics.
pub fn diagnose(stats: &Stats) -> Diagnosis {
    let mut findings = Vec::new();
    for record in stats.blocks() {
        findings.push(block_finding(record));
    }
    if let Some(region) = region_finding(stats) {
        findings.push(region);
    }
    for (name, b) in stats.backends() {
        if let Some(finding) = cause_finding(name, b) {
            findings.push(finding);
        }
    }
    Diagnosis { findings }
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "n/a".into()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

fn cause_finding(name: &str, b: &BackendStats) -> Option<Finding> {
    let total = b.throttled.total();
    if total == 0 {
        return None;
    }
    let causes = [
        ThrottleCause::Quota,
        ThrottleCause::Capacity,
        ThrottleCause::Provisioned,
        ThrottleCause::Unknown,
    ];
    let (top, count) = causes
        .iter()
        .map(|c| (*c, b.throttled.get(*c)))
        .max_by_key(|(_, n)| *n)
        .unwrap_or((ThrottleCause::Unknown, 0));
    let dominant = count as f64 >= DOMINANT_SHARE * total as f64;
    let region = b.region.clone();
    let where_ = region.as_deref().map_or_else(
        || format!("backend {name}"),
        |r| format!("backend {name} ({r})"),
    );
    let mut evidence = vec![
        ("attempts".to_owned(), b.requests.to_string()),
        (
            "429s".to_owned(),
            format!("{total} ({} of attempts)", pct(total, b.requests)),
        ),
        (
            "429s by cause".to_owned(),
            format!(
                "quota {}, capacity {}, provisioned {}, unknown {}",
                b.throttled.quota,
                b.throttled.capacity,
                b.throttled.provisioned,
                b.throttled.unknown
            ),
        ),
    ];
    let headroom = b.headroom_before_throttle.unwrap_or(b.headroom);
    let mut below_quota = false;
    if let Some(f) = headroom.tokens_fraction() {
        evidence.push((
            "token headroom before the last 429".to_owned(),
            format!(
                "{} of {} tokens/min left ({:.0} %)",
                headroom.remaining_tokens.unwrap_or(0),
                headroom.limit_tokens.unwrap_or(0),
                f * 100.0
            ),
        ));
        below_quota = f >= 0.2;
    } else if let Some(remaining) = headroom.remaining_tokens {
        evidence.push((
            "remaining tokens before the last 429".to_owned(),
            remaining.to_string(),
        ));
    }
    if let Some(f) = headroom.requests_fraction() {
        evidence.push((
            "request headroom before the last 429".to_owned(),
            format!("{:.0} % of the per-minute requests left", f * 100.0),
        ));
    }
    let (kind, summary, advice) = match (dominant, top) {
        (true, ThrottleCause::Capacity) => (
            FindingKind::Capacity,
            format!(
                "Capacity: {where_} was throttled for regional high demand (\"peak load\"), not for its own quota{}.",
                if below_quota { " — the deployment still had headroom" } else { "" }
            ),
            "Spread load to a deployment in another region (failover/hedging), smooth bursts and \
             concurrency, or move steady traffic to provisioned throughput; raising TPM will not help."
                .to_owned(),
        ),
        (true, ThrottleCause::Quota) => (
            FindingKind::Quota,
            format!("Quota: {where_} exceeded its own token or request rate limit (TPM/RPM)."),
            "Pace requests (RPM is enforced over 1 s / 10 s windows, so bursts trip it below the \
             per-minute figure), lower max_tokens (it counts against TPM up front), or raise the \
             deployment's quota."
                .to_owned(),
        ),
        (true, ThrottleCause::Provisioned) => (
            FindingKind::Provisioned,
            format!("Provisioned: {where_} (a PTU deployment) was at 100 % utilisation."),
            "Let the limiter queue at the PTU's rate, spill over to a standard deployment, or buy \
             more PTUs."
                .to_owned(),
        ),
        _ => (
            FindingKind::Unclear,
            format!("Unclear: {where_}'s 429s did not say (or disagreed on) why."),
            "Check the 429 bodies in the debug log; the figures above show the mix.".to_owned(),
        ),
    };
    Some(Finding {
        kind,
        backend: Some(name.to_owned()),
        region,
        summary,
        evidence,
        advice,
        support_record: None,
    })
}

fn region_finding(stats: &Stats) -> Option<Finding> {
    // Throttle rate per region, over every backend in it.
    let mut regions: Vec<(String, u64, u64)> = Vec::new();
    for (_, b) in stats.backends() {
        let Some(region) = b.region.clone() else {
            continue;
        };
        match regions.iter_mut().find(|(r, ..)| *r == region) {
            Some((_, attempts, throttles)) => {
                *attempts += b.requests;
                *throttles += b.throttled.total();
            }
            None => regions.push((region, b.requests, b.throttled.total())),
        }
    }
    if regions.len() < 2 {
        return None;
    }
    let rate = |(_, attempts, throttles): &(String, u64, u64)| {
        if *attempts == 0 {
            0.0
        } else {
            *throttles as f64 / *attempts as f64
        }
    };
    regions.sort_by(|a, b| rate(b).total_cmp(&rate(a)));
    let worst = &regions[0];
    let next = &regions[1];
    if rate(worst) < REGION_MIN_RATE || rate(worst) < REGION_RATIO * rate(next) {
        return None;
    }
    let mut evidence: Vec<(String, String)> = regions
        .iter()
        .map(|(r, attempts, throttles)| {
            (
                format!("429 rate in {r}"),
                format!(
                    "{} ({throttles} of {attempts} attempts)",
                    pct(*throttles, *attempts)
                ),
            )
        })
        .collect();
    evidence.truncate(8);
    let mut summary = String::new();
    let _ = write!(
        summary,
        "Region: throttling is concentrated in {} while {} serves.",
        worst.0, next.0
    );
    Some(Finding {
        kind: FindingKind::Region,
        backend: None,
        region: Some(worst.0.clone()),
        summary,
        evidence,
        advice: format!(
            "Prefer the other region(s) for now (lower {}'s weight or tier); this pattern is the \
             service's regional capacity, not your configuration.",
            worst.0
        ),
        support_record: None,
    })
}

fn block_finding(record: &SupportRecord) -> Finding {
    let region = record.ms_region.clone().or_else(|| record.region.clone());
    Finding {
        kind: FindingKind::Blocked,
        backend: Some(record.backend.clone()),
        region,
        summary: format!(
            "Blocked: resource {} answered 403 \"temporarily blocked\" (abuse monitoring; the whole \
             resource, typically for hours).",
            record.resource
        ),
        evidence: vec![
            (
                "apim-request-id".to_owned(),
                record
                    .apim_request_id
                    .clone()
                    .unwrap_or_else(|| "(not given)".into()),
            ),
            ("time".to_owned(), httpdate::fmt_http_date(record.time)),
        ],
        advice: "Stop all traffic to this resource (tower-aoai's breaker does), file a support \
                 request with the record below, and ramp up gradually afterwards: the limiter's \
                 slow start after idle avoids the idle-then-burst pattern that triggers this."
            .to_owned(),
        support_record: Some(record.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::classify_response;
    use crate::policy::stats::Attempt;
    use http::{HeaderMap, HeaderValue, StatusCode};
    use std::time::{Duration, SystemTime};

    const PEAK: &str = r#"{"error":{"code":"429","message":"The system is currently experiencing high demand and cannot process your request. Your request exceeds the maximum usage size allowed during peak load."}}"#;
    const QUOTA: &str = r#"{"error":{"code":"429","message":"Requests have exceeded token rate limit of your current OpenAI S0 pricing tier."}}"#;
    const PTU: &str = r#"{"error":{"code":"429","message":"The provisioned deployment is at 100% utilization."}}"#;

    fn observe(stats: &mut Stats, backend: &str, region: &str, status: u16, body: &str) {
        let mut headers = HeaderMap::new();
        if status == 200 {
            headers.insert(
                "x-ratelimit-remaining-tokens",
                HeaderValue::from_static("900000"),
            );
            headers.insert(
                "x-ratelimit-limit-tokens",
                HeaderValue::from_static("1000000"),
            );
        }
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let class = classify_response(
            StatusCode::from_u16(status).unwrap(),
            &headers,
            Some(body.as_bytes()),
            wall,
        );
        stats.record(Attempt {
            backend,
            region: Some(region),
            class: &class,
            headers: Some(&headers),
            latency: None,
            retry: false,
            hedge: false,
            wall_now: wall,
        });
    }

    #[test]
    fn capacity_below_quota_in_one_region() {
        let mut stats = Stats::new();
        for i in 0..100 {
            observe(
                &mut stats,
                "eus2",
                "eastus2",
                if i % 3 == 0 { 429 } else { 200 },
                PEAK,
            );
            observe(&mut stats, "swc", "swedencentral", 200, "");
        }
        let d = diagnose(&stats);
        assert_eq!(d.kinds(), vec![FindingKind::Region, FindingKind::Capacity]);
        let capacity = &d.findings[1];
        assert_eq!(capacity.backend.as_deref(), Some("eus2"));
        assert!(
            capacity.summary.contains("still had headroom"),
            "{}",
            capacity.summary
        );
        assert_eq!(d.findings[0].region.as_deref(), Some("eastus2"));
        let text = d.to_string();
        assert!(
            text.contains("429 rate in eastus2: 34.0 % (34 of 100 attempts)"),
            "{text}"
        );
    }

    #[test]
    fn quota_and_provisioned_are_named() {
        let mut stats = Stats::new();
        for _ in 0..5 {
            observe(&mut stats, "std", "westeurope", 429, QUOTA);
            observe(&mut stats, "ptu", "westeurope", 429, PTU);
        }
        observe(&mut stats, "std", "westeurope", 429, PEAK);
        let d = diagnose(&stats);
        // Same region: no regional finding; one per backend, in name order.
        assert_eq!(
            d.kinds(),
            vec![FindingKind::Provisioned, FindingKind::Quota]
        );
    }

    #[test]
    fn a_mix_is_unclear() {
        let mut stats = Stats::new();
        observe(&mut stats, "a", "x", 429, QUOTA);
        observe(&mut stats, "a", "x", 429, PEAK);
        assert_eq!(diagnose(&stats).kinds(), vec![FindingKind::Unclear]);
    }

    #[test]
    fn nothing_to_say_when_all_is_well() {
        let mut stats = Stats::new();
        observe(&mut stats, "a", "x", 200, "");
        let d = diagnose(&stats);
        assert!(d.is_empty());
        assert_eq!(d.to_string(), "No throttling or blocks observed.");
    }
}
