//! Backends: where a request may go, with which credentials, and how it is rewritten for it.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::policy::ConfigError;
use crate::policy::headers;

/// The most backends one router holds (a call remembers the backends it tried in a 64-bit set).
pub const MAX_BACKENDS: usize = 64;

/// Request headers that carry a secret: every one is removed before a request is sent, so a key
/// given for one backend never reaches another backend's host.
const AUTH_HEADERS: [HeaderName; 4] = [
    headers::API_KEY,
    AUTHORIZATION,
    HeaderName::from_static("ocp-apim-subscription-key"),
    HeaderName::from_static("x-api-key"),
];

/// A source of bearer tokens (Entra ID, OpenAI keys), called for every attempt so it can refresh.
pub type TokenProvider = Arc<dyn Fn() -> String + Send + Sync>;

/// How a backend authenticates. `Debug` never prints the secret.
#[derive(Clone, Default)]
enum Credentials {
    /// No auth header is sent (any the request came with is still removed).
    #[default]
    None,
    /// `api-key: <key>` (Azure key auth).
    ApiKey(HeaderValue),
    /// `authorization: Bearer <token>`, the token from a provider.
    Bearer(TokenProvider),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::ApiKey(_) => "ApiKey(<redacted>)",
            Credentials::Bearer(_) => "Bearer(<provider>)",
        })
    }
}

/// One place a request can be served: an endpoint (the Azure OpenAI resource), a deployment on
/// it, the credentials for it, and how much it is preferred.
///
/// Built with [`Backend::new`] and the `with_*` methods; checked when the list is assembled into
/// [`Backends`]. `Debug` redacts the credentials.
#[derive(Clone, Debug)]
pub struct Backend {
    name: String,
    endpoint: String,
    deployment: Option<String>,
    region: Option<String>,
    credentials: Credentials,
    api_key_error: Option<String>,
    tier: u8,
    weight: u32,
}

impl Backend {
    /// A backend called `name` (unique in its list, used in logs and stats) at `endpoint`
    /// (`https://<resource>.openai.azure.com`, optionally with a base path such as an APIM API
    /// prefix). Tier 0, weight 1, no deployment rewrite, no credentials.
    pub fn new(name: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            endpoint: endpoint.into(),
            deployment: None,
            region: None,
            credentials: Credentials::None,
            api_key_error: None,
            tier: 0,
            weight: 1,
        }
    }

    /// The deployment to use on this backend: replaces the `/openai/deployments/{d}/` path segment
    /// and the `model` of `/openai/v1/...` and `/openai/responses` bodies.
    pub fn with_deployment(mut self, deployment: impl Into<String>) -> Self {
        self.deployment = Some(deployment.into());
        self
    }

    /// A region label (`"eastus2"`), for logs, stats and the support record.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Authenticates with `api-key: <key>`.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        match HeaderValue::try_from(key.into()) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.credentials = Credentials::ApiKey(value);
                self.api_key_error = None;
            }
            Err(_) => {
                self.credentials = Credentials::None;
                self.api_key_error = Some("is not a valid header value".into());
            }
        }
        self
    }

    /// Authenticates with `authorization: Bearer <token>`, asking `provider` for the token before
    /// every attempt (so it may cache and refresh it).
    pub fn with_token_provider(
        mut self,
        provider: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        self.credentials = Credentials::Bearer(Arc::new(provider));
        self.api_key_error = None;
        self
    }

    /// The preference group: every usable backend of a lower tier is used before any of a higher
    /// one (provisioned = 0, standard = 1, ...).
    pub fn with_tier(mut self, tier: u8) -> Self {
        self.tier = tier;
        self
    }

    /// The share of traffic within its tier, relative to the other backends of the tier.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The endpoint as configured.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The deployment, if requests are rewritten to one.
    pub fn deployment(&self) -> Option<&str> {
        self.deployment.as_deref()
    }

    /// The region label.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// The tier (lower is preferred).
    pub fn tier(&self) -> u8 {
        self.tier
    }

    /// The weight within the tier.
    pub fn weight(&self) -> u32 {
        self.weight
    }
}

/// Index of a backend in its [`Backends`] list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub(crate) usize);

impl BackendId {
    /// The position of the backend in the list it was configured in.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Index of a resource (an endpoint host shared by one or more backends) in a [`Backends`] list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(pub(crate) usize);

impl ResourceId {
    /// The position of the resource among the distinct endpoint hosts, in order of appearance.
    pub fn index(self) -> usize {
        self.0
    }
}

#[derive(Debug, Clone)]
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// `authority` as a `host` header value, made once.
    host_value: HeaderValue,
    /// The endpoint's path without its trailing `/` (empty for a bare host).
    base_path: String,
    resource: ResourceId,
}

/// A checked, non-empty list of backends with unique names and valid endpoints.
#[derive(Debug, Clone)]
pub struct Backends {
    backends: Vec<Backend>,
    targets: Vec<Target>,
    resources: Vec<String>,
}

impl Backends {
    /// Checks `backends`: not empty, at most [`MAX_BACKENDS`], unique non-empty names, `http`/`https`
    /// endpoints with a host, weights above zero, deployments that fit in a path segment.
    /// The error names the field and the backend's position.
    pub fn new(backends: Vec<Backend>) -> Result<Self, ConfigError> {
        if backends.is_empty() {
            return Err(ConfigError::new(
                "backends",
                "must name at least one backend",
            ));
        }
        if backends.len() > MAX_BACKENDS {
            return Err(ConfigError::new(
                "backends",
                format!("at most {MAX_BACKENDS} backends, got {}", backends.len()),
            ));
        }
        let mut targets = Vec::with_capacity(backends.len());
        let mut resources: Vec<String> = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let at = |reason: String| format!("{:?}: {reason}", b.name);
            if b.name.trim().is_empty() {
                return Err(
                    ConfigError::new("backends.name", at("must not be empty".into())).at_index(i),
                );
            }
            if let Some(j) = backends[..i].iter().position(|o| o.name == b.name) {
                return Err(ConfigError::new(
                    "backends.name",
                    at(format!("duplicates backends[{j}]")),
                )
                .at_index(i));
            }
            if b.weight == 0 {
                return Err(ConfigError::new(
                    "backends.weight",
                    at("must be greater than zero".into()),
                )
                .at_index(i));
            }
            if let Some(reason) = &b.api_key_error {
                return Err(ConfigError::new("backends.api_key", at(reason.clone())).at_index(i));
            }
            if let Some(d) = &b.deployment
                && (d.is_empty()
                    || !d
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)))
            {
                return Err(ConfigError::new(
                    "backends.deployment",
                    at(format!(
                        "{d:?} must be non-empty letters, digits, '-', '_' or '.'"
                    )),
                )
                .at_index(i));
            }
            let (scheme, authority, base_path) = parse_endpoint(&b.endpoint)
                .map_err(|r| ConfigError::new("backends.endpoint", at(r)).at_index(i))?;
            // The resource is the endpoint host (and its port, when it is not the scheme's
            // default: two local proxies on one host are two endpoints).
            let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
            let host = match authority.port_u16() {
                Some(port) if port != default_port => {
                    format!("{}:{port}", authority.host().to_ascii_lowercase())
                }
                _ => authority.host().to_ascii_lowercase(),
            };
            let resource = match resources.iter().position(|r| *r == host) {
                Some(r) => ResourceId(r),
                None => {
                    resources.push(host);
                    ResourceId(resources.len() - 1)
                }
            };
            let host_value = HeaderValue::from_str(authority.as_str()).map_err(|_| {
                ConfigError::new("backends.endpoint", at("host is not a valid header".into()))
                    .at_index(i)
            })?;
            targets.push(Target {
                scheme,
                host_value,
                authority,
                base_path,
                resource,
            });
        }
        Ok(Self {
            backends,
            targets,
            resources,
        })
    }

    /// How many backends there are.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Always `false`: the list is checked to be non-empty.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The backend `id`.
    pub fn get(&self, id: BackendId) -> &Backend {
        &self.backends[id.0]
    }

    /// The ids of every backend, in configuration order.
    pub fn ids(&self) -> impl Iterator<Item = BackendId> + '_ {
        (0..self.backends.len()).map(BackendId)
    }

    /// The backend called `name`.
    pub fn find(&self, name: &str) -> Option<BackendId> {
        self.backends
            .iter()
            .position(|b| b.name == name)
            .map(BackendId)
    }

    /// The resource (endpoint host) the backend belongs to.
    pub fn resource(&self, id: BackendId) -> ResourceId {
        self.targets[id.0].resource
    }

    /// The host name of a resource.
    pub fn resource_host(&self, resource: ResourceId) -> &str {
        &self.resources[resource.0]
    }

    /// How many distinct resources the backends are spread over.
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Whether sending this request to `id` rewrites its body (a `/openai/v1/...` or
    /// `/openai/responses` call to a backend with a deployment), so the driver reads the body
    /// only when it must.
    pub fn rewrites_body(&self, id: BackendId, uri: &Uri) -> bool {
        self.backends[id.0].deployment.is_some() && body_names_model(openai_tail(uri.path()))
    }

    /// How a request for `uri` is rewritten for backend `id`, leaving its headers to the caller
    /// (a driver with headers of its own, such as the Python transports, applies it without
    /// converting them all): the new URI (scheme, host and port; the endpoint's base path; the
    /// `/openai/deployments/{d}/` segment), the `host` value, the auth header, and the new body
    /// when the `model` of a JSON body was replaced (`body` is the request body, needed only when
    /// [`rewrites_body`](Self::rewrites_body)). [`rewrite`](Self::rewrite) applies it to
    /// `http::request::Parts`.
    pub fn plan(
        &self,
        id: BackendId,
        uri: &Uri,
        body: Option<&[u8]>,
    ) -> Result<RewritePlan, RewriteError> {
        let backend = &self.backends[id.0];
        let target = &self.targets[id.0];
        let path = uri.path();
        let tail = openai_tail(path);
        let names_model = body_names_model(tail);
        // The request's own path and query, reused as they are (no copy, no parse) when this
        // backend wants the same: its base path before the tail, and its deployment (if it sets
        // one) already in the path. Else the path is built anew.
        let same_deployment = match (
            &backend.deployment,
            tail.strip_prefix("/openai/deployments/"),
        ) {
            (Some(deployment), Some(rest)) => rest.split('/').next() == Some(deployment.as_str()),
            _ => true,
        };
        let reusable = uri.path_and_query().filter(|_| {
            same_deployment
                && !tail.is_empty()
                && path.len() - tail.len() == target.base_path.len()
                && path.starts_with(target.base_path.as_str())
        });
        let path_and_query = match reusable {
            Some(same) => same.clone(),
            None => new_path_and_query(
                &target.base_path,
                tail,
                backend.deployment.as_deref(),
                uri.query(),
            )?,
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(target.scheme.clone());
        parts.authority = Some(target.authority.clone());
        parts.path_and_query = Some(path_and_query);
        let uri = Uri::from_parts(parts).map_err(|_| RewriteError::Uri)?;
        let auth = match &backend.credentials {
            Credentials::None => None,
            Credentials::ApiKey(key) => Some((headers::API_KEY, key.clone())),
            Credentials::Bearer(provider) => {
                let mut value = HeaderValue::try_from(format!("Bearer {}", provider()))
                    .map_err(|_| RewriteError::Token)?;
                value.set_sensitive(true);
                Some((AUTHORIZATION, value))
            }
        };
        let body = match (&backend.deployment, body) {
            (Some(deployment), Some(body)) if names_model => replace_model(body, deployment),
            _ => None,
        };
        Ok(RewritePlan {
            uri,
            host: target.host_value.clone(),
            auth,
            body,
        })
    }

    /// Rewrites a request for backend `id` by its [`plan`](Self::plan): the URI; `host` (if the
    /// request has one); every auth header the request came with ([`RewritePlan::REMOVED`])
    /// replaced by the backend's; `content-length` (if the request has one) for a new body,
    /// which is returned.
    pub fn rewrite(
        &self,
        id: BackendId,
        parts: &mut http::request::Parts,
        body: Option<&[u8]>,
    ) -> Result<Option<Bytes>, RewriteError> {
        let (rewritten, body) = self.rewritten(id, parts, body)?;
        *parts = rewritten;
        Ok(body)
    }

    /// [`rewrite`](Self::rewrite) into a new copy of `parts`, which stay as they are (a driver
    /// keeps them to try again): the headers are copied once, with the plan applied as they are
    /// copied, instead of cloned and then edited (a clone has no room for the backend's auth
    /// header, and growing it costs more than the copy).
    pub fn rewritten(
        &self,
        id: BackendId,
        parts: &http::request::Parts,
        body: Option<&[u8]>,
    ) -> Result<(http::request::Parts, Option<Bytes>), RewriteError> {
        let plan = self.plan(id, &parts.uri, body)?;
        // Room for the backend's auth header and for what a client adds on its way out (`host`,
        // `content-length`): growing a map costs more than the copy.
        // A map never panics here: past what a header map holds, the rewrite is an error.
        let names = parts.headers.keys_len();
        let mut headers = HeaderMap::try_with_capacity(names + 4)
            .or_else(|_| HeaderMap::try_with_capacity(names))
            .map_err(|_| RewriteError::Headers)?;
        let new_length = plan.body.as_ref().map(|b| HeaderValue::from(b.len()));
        let (mut host, mut length) = (false, false);
        for (name, value) in &parts.headers {
            if RewritePlan::REMOVED.contains(name) {
                continue;
            }
            // `host` and a new body's `content-length` keep their place, with one value.
            let replaced = if name == HOST {
                Some((&mut host, &plan.host))
            } else if name == http::header::CONTENT_LENGTH {
                new_length.as_ref().map(|v| (&mut length, v))
            } else {
                None
            };
            let copied = match replaced {
                Some((done, _)) if *done => continue,
                Some((done, new)) => {
                    *done = true;
                    headers.try_append(name.clone(), new.clone())
                }
                None => headers.try_append(name.clone(), value.clone()),
            };
            copied.map_err(|_| RewriteError::Headers)?;
        }
        if let Some((name, value)) = plan.auth {
            headers
                .try_insert(name, value)
                .map_err(|_| RewriteError::Headers)?;
        }
        let (mut rewritten, ()) = http::Request::new(()).into_parts();
        rewritten.method = parts.method.clone();
        rewritten.uri = plan.uri;
        rewritten.version = parts.version;
        rewritten.headers = headers;
        rewritten.extensions = parts.extensions.clone();
        Ok((rewritten, plan.body))
    }
}

/// How a request is rewritten for a backend ([`Backends::plan`]). Applied to a request's
/// headers: `host`, if present, becomes [`host`](Self::host); every header of
/// [`REMOVED`](Self::REMOVED) goes, then [`auth`](Self::auth) is set; with a new
/// [`body`](Self::body), `content-length`, if present, becomes its length.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RewritePlan {
    /// Where the request goes.
    pub uri: Uri,
    /// The `host` header's value for the backend (set only if the request has the header).
    pub host: HeaderValue,
    /// The backend's auth header (`api-key` or a bearer `authorization`, marked sensitive), if
    /// it has credentials.
    pub auth: Option<(HeaderName, HeaderValue)>,
    /// The new body, when the `model` of a JSON body was replaced.
    pub body: Option<Bytes>,
}

impl RewritePlan {
    /// The auth headers a request loses before the backend's own is set: a caller's key or token
    /// never reaches another backend.
    pub const REMOVED: [HeaderName; 4] = AUTH_HEADERS;
}

/// A request could not be rewritten for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RewriteError {
    /// The rewritten URI is not valid.
    Uri,
    /// The token provider returned a value that cannot be sent in a header.
    Token,
    /// The request has more headers than a header map can hold with the backend's.
    Headers,
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RewriteError::Uri => "the request URI could not be rewritten for the backend",
            RewriteError::Token => "the token provider returned a value that is not a valid header",
            RewriteError::Headers => "the request has too many headers to be rewritten",
        })
    }
}

impl std::error::Error for RewriteError {}

fn parse_endpoint(endpoint: &str) -> Result<(Scheme, Authority, String), String> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL ({e})"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{endpoint:?} has no scheme (use https://...)"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "scheme must be http or https, got {:?}",
            scheme.as_str()
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| format!("{endpoint:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("must not carry user info (put keys in the credentials)".into());
    }
    if uri.query().is_some() {
        return Err(format!("{endpoint:?} must not have a query"));
    }
    let base = uri.path().trim_end_matches('/');
    // An endpoint given down to `/openai` is the same resource as its bare host.
    let base = base.strip_suffix("/openai").unwrap_or(base);
    Ok((scheme, authority, base.to_owned()))
}

/// The part of a path from `/openai` on (the whole path when it has no `/openai` segment), so a
/// request made against one endpoint's base path can be moved under another's.
fn openai_tail(path: &str) -> &str {
    if path == "/openai" || path.starts_with("/openai/") {
        return path;
    }
    match path.find("/openai/") {
        Some(at) => &path[at..],
        None if path.ends_with("/openai") => &path[path.len() - "/openai".len()..],
        None => path,
    }
}

/// The base path, then the tail with its `/openai/deployments/{d}/` segment naming `deployment`
/// (when set), then the query.
fn new_path_and_query(
    base_path: &str,
    tail: &str,
    deployment: Option<&str>,
    query: Option<&str>,
) -> Result<PathAndQuery, RewriteError> {
    let mut new_path = String::with_capacity(base_path.len() + tail.len() + 16);
    new_path.push_str(base_path);
    match (deployment, tail.strip_prefix("/openai/deployments/")) {
        (Some(deployment), Some(rest)) => {
            let after = rest.find('/').map_or("", |at| &rest[at..]);
            new_path.push_str("/openai/deployments/");
            new_path.push_str(deployment);
            new_path.push_str(after);
        }
        _ => new_path.push_str(tail),
    }
    if new_path.is_empty() {
        new_path.push('/');
    }
    if let Some(query) = query {
        new_path.push('?');
        new_path.push_str(query);
    }
    PathAndQuery::try_from(new_path).map_err(|_| RewriteError::Uri)
}

fn body_names_model(tail: &str) -> bool {
    tail.starts_with("/openai/v1/")
        || tail == "/openai/responses"
        || tail.starts_with("/openai/responses/")
}

/// The body with its top-level `model` set to `deployment`, or `None` when the body is not a JSON
/// object (then it is sent as it is).
fn replace_model(body: &[u8], deployment: &str) -> Option<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object_mut()?;
    if object.get("model").and_then(|m| m.as_str()) == Some(deployment) {
        return None;
    }
    object.insert("model".into(), serde_json::Value::String(deployment.into()));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, headers: &[(&'static str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn two() -> Backends {
        Backends::new(vec![
            Backend::new("east", "https://east.example.com")
                .with_deployment("gpt4o-east")
                .with_api_key("EAST-KEY")
                .with_region("eastus2"),
            Backend::new("west", "https://apim.example.net:8443/team-a/")
                .with_deployment("gpt4o-west")
                .with_token_provider(|| "WEST-TOKEN".to_owned())
                .with_tier(1),
        ])
        .unwrap()
    }

    #[test]
    fn validation_names_the_field_and_position() {
        let err = Backends::new(vec![]).unwrap_err();
        assert_eq!(err.field(), "backends");
        let err = Backends::new(vec![
            Backend::new("a", "https://a.example"),
            Backend::new("a", "https://b.example"),
        ])
        .unwrap_err();
        assert_eq!(err.field(), "backends.name");
        assert_eq!(err.path(), "backends[1].name");
        assert!(err.reason().contains("backends[0]"), "{err}");
        for (endpoint, needle) in [
            ("ftp://a.example", "scheme"),
            ("a.example", "scheme"),
            ("https://", "URL"),
            ("not a url", "URL"),
            ("https://user:pw@a.example", "user info"),
        ] {
            let err = Backends::new(vec![
                Backend::new("ok", "https://ok.example"),
                Backend::new("bad", endpoint),
            ])
            .unwrap_err();
            assert_eq!(err.field(), "backends.endpoint", "{endpoint}");
            assert!(
                err.to_string()
                    .starts_with("invalid `backends[1].endpoint`"),
                "{err}"
            );
            assert!(err.reason().contains(needle), "{endpoint}: {err}");
        }
        let err =
            Backends::new(vec![Backend::new("a", "https://a.example").with_weight(0)]).unwrap_err();
        assert_eq!(err.field(), "backends.weight");
        let err = Backends::new(vec![
            Backend::new("a", "https://a.example").with_deployment("x/y"),
        ])
        .unwrap_err();
        assert_eq!(err.field(), "backends.deployment");
        let err = Backends::new(vec![
            Backend::new("a", "https://a.example").with_api_key("k\n"),
        ])
        .unwrap_err();
        assert_eq!(err.field(), "backends.api_key");
        assert!(!err.to_string().contains("k\n"));
    }

    #[test]
    fn resources_are_endpoint_hosts() {
        let b = Backends::new(vec![
            Backend::new("a1", "https://A.example.com").with_deployment("d1"),
            Backend::new("a2", "https://a.example.com:443/").with_deployment("d2"),
            Backend::new("b", "https://b.example.com"),
            Backend::new("local1", "http://127.0.0.1:8001"),
            Backend::new("local2", "http://127.0.0.1:8002"),
        ])
        .unwrap();
        assert_eq!(b.resource(BackendId(0)), b.resource(BackendId(1)));
        assert_ne!(b.resource(BackendId(0)), b.resource(BackendId(2)));
        assert_ne!(b.resource(BackendId(3)), b.resource(BackendId(4)));
        assert_eq!(b.resource_count(), 4);
        assert_eq!(b.resource_host(b.resource(BackendId(4))), "127.0.0.1:8002");
        assert_eq!(b.resource_host(b.resource(BackendId(2))), "b.example.com");
    }

    #[test]
    fn debug_never_prints_secrets() {
        let b = two();
        let text = format!("{b:?} {:?}", b.get(BackendId(0)));
        assert!(!text.contains("EAST-KEY"), "{text}");
        assert!(!text.contains("WEST-TOKEN"), "{text}");
        assert!(text.contains("redacted"));
        let mut p = parts(
            "https://x.example/openai/deployments/x/chat/completions",
            &[],
        );
        b.rewrite(BackendId(0), &mut p, None).unwrap();
        assert!(!format!("{:?}", p.headers).contains("EAST-KEY"));
    }

    #[test]
    fn rewrites_host_path_and_deployment() {
        let b = two();
        let mut p = parts(
            "https://orig.example/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21",
            &[("host", "orig.example")],
        );
        assert_eq!(b.rewrite(BackendId(0), &mut p, None).unwrap(), None);
        assert_eq!(
            p.uri,
            "https://east.example.com/openai/deployments/gpt4o-east/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(p.headers["host"], "east.example.com");
        let mut p = parts(
            "http://orig.example/openai/deployments/gpt4o/embeddings",
            &[],
        );
        b.rewrite(BackendId(1), &mut p, None).unwrap();
        assert_eq!(
            p.uri,
            "https://apim.example.net:8443/team-a/openai/deployments/gpt4o-west/embeddings"
        );
        assert!(!p.headers.contains_key("host"));
        // A request already made against a base path moves under the other backend's.
        let mut p = parts(
            "https://apim.example.net:8443/team-a/openai/deployments/z/x",
            &[],
        );
        b.rewrite(BackendId(0), &mut p, None).unwrap();
        assert_eq!(
            p.uri,
            "https://east.example.com/openai/deployments/gpt4o-east/x"
        );
    }

    #[test]
    fn a_path_the_backend_already_wants_is_kept_and_a_near_miss_is_rebuilt() {
        let b = two();
        // Already this backend's base path and deployment: kept, query and all.
        let mut p = parts(
            "http://old.example/team-a/openai/deployments/gpt4o-west/chat/completions?api-version=1&x=%20",
            &[],
        );
        b.rewrite(BackendId(1), &mut p, None).unwrap();
        assert_eq!(
            p.uri,
            "https://apim.example.net:8443/team-a/openai/deployments/gpt4o-west/chat/completions?api-version=1&x=%20"
        );
        // One character short of the deployment, or under another base path: rebuilt.
        for (from, want) in [
            (
                "https://apim.example.net:8443/team-a/openai/deployments/gpt4o-wes/chat/completions",
                "https://apim.example.net:8443/team-a/openai/deployments/gpt4o-west/chat/completions",
            ),
            (
                "https://apim.example.net:8443/team-b/openai/deployments/gpt4o-west/embeddings?q=1",
                "https://apim.example.net:8443/team-a/openai/deployments/gpt4o-west/embeddings?q=1",
            ),
            (
                "https://apim.example.net:8443/openai/deployments/gpt4o-west",
                "https://apim.example.net:8443/team-a/openai/deployments/gpt4o-west",
            ),
        ] {
            let mut p = parts(from, &[]);
            b.rewrite(BackendId(1), &mut p, None).unwrap();
            assert_eq!(p.uri, want, "from {from}");
        }
        // A backend without a deployment keeps any path under its (empty) base path.
        let plain = Backends::new(vec![Backend::new("p", "http://127.0.0.1:9")]).unwrap();
        let mut p = parts("https://x.example/openai/v1/chat/completions?a=b", &[]);
        plain.rewrite(BackendId(0), &mut p, None).unwrap();
        assert_eq!(p.uri, "http://127.0.0.1:9/openai/v1/chat/completions?a=b");
    }

    #[test]
    fn rewrites_model_of_v1_and_responses_bodies() {
        let b = two();
        for path in [
            "/openai/v1/chat/completions",
            "/openai/responses?api-version=preview",
        ] {
            let uri: Uri = format!("https://orig.example{path}").parse().unwrap();
            assert!(b.rewrites_body(BackendId(1), &uri));
            let mut p = parts(&uri.to_string(), &[("content-length", "40")]);
            let body = br#"{"model":"gpt4o","messages":[],"n":1}"#;
            let new = b
                .rewrite(BackendId(1), &mut p, Some(body))
                .unwrap()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&new).unwrap();
            assert_eq!(v["model"], "gpt4o-west");
            assert_eq!(v["n"], 1);
            assert_eq!(p.headers["content-length"], new.len().to_string().as_str());
        }
        let uri: Uri = "https://o.example/openai/deployments/d/chat/completions"
            .parse()
            .unwrap();
        assert!(!b.rewrites_body(BackendId(1), &uri));
        let mut p = parts("https://o.example/openai/v1/chat/completions", &[]);
        assert_eq!(
            b.rewrite(BackendId(1), &mut p, Some(b"not json")).unwrap(),
            None
        );
    }

    #[test]
    fn a_rewritten_copy_keeps_every_other_header_in_order_and_leaves_the_original() {
        let b = two();
        let mut orig = parts(
            "https://orig.example/openai/v1/chat/completions",
            &[
                ("host", "orig.example"),
                ("x-first", "1"),
                ("api-key", "CALLER-KEY"),
                ("accept", "a"),
                ("content-length", "40"),
                ("accept", "b"),
                ("host", "second.example"),
                ("authorization", "Bearer CALLER"),
                ("x-last", "2"),
            ],
        );
        orig.method = http::Method::PUT;
        orig.version = http::Version::HTTP_2;
        orig.extensions.insert(7u32);
        let before = format!("{:?}", orig.headers);
        let body = br#"{"model":"m","messages":[]}"#;
        let (p, new) = b.rewritten(BackendId(0), &orig, Some(body)).unwrap();
        let new = new.unwrap();
        assert_eq!(
            format!("{:?}", orig.headers),
            before,
            "the original is untouched"
        );
        let got: Vec<(String, String)> = p
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        let want = [
            ("host", "east.example.com"),
            ("x-first", "1"),
            ("accept", "a"),
            ("accept", "b"),
            ("content-length", new.len().to_string().as_str()),
            ("x-last", "2"),
            ("api-key", "EAST-KEY"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(got, want);
        assert_eq!(p.method, http::Method::PUT);
        assert_eq!(p.version, http::Version::HTTP_2);
        assert_eq!(p.extensions.get::<u32>(), Some(&7));
        assert_eq!(p.uri, "https://east.example.com/openai/v1/chat/completions");
        // Without a new body, content-length stays as the caller sent it.
        let (p, none) = b.rewritten(BackendId(0), &orig, None).unwrap();
        assert_eq!(none, None);
        assert_eq!(p.headers["content-length"], "40");
        // `rewrite` in place is the same copy.
        let mut in_place = orig.clone();
        b.rewrite(BackendId(0), &mut in_place, None).unwrap();
        assert_eq!(
            format!("{:?}", in_place.headers),
            format!("{:?}", p.headers)
        );
    }

    #[test]
    fn a_request_with_more_headers_than_a_map_holds_is_an_error_not_a_panic() {
        let b = two();
        let mut p = parts(
            "https://orig.example/openai/deployments/d/chat/completions",
            &[],
        );
        // As many names as a map holds: the backend's key is one too many.
        for i in 0.. {
            let name = HeaderName::try_from(format!("x-h{i}")).unwrap();
            if p.headers
                .try_insert(name, HeaderValue::from_static("v"))
                .is_err()
            {
                break;
            }
        }
        let err = b.rewritten(BackendId(0), &p, None).unwrap_err();
        assert_eq!(err, RewriteError::Headers);
        // A handful fewer names fit with the key.
        let few = parts(
            "https://orig.example/openai/deployments/d/chat/completions",
            &[("x-a", "1")],
        );
        assert!(b.rewritten(BackendId(0), &few, None).is_ok());
    }

    #[test]
    fn a_key_only_ever_reaches_its_own_host() {
        let b = two();
        let incoming = [
            ("api-key", "CALLER-KEY"),
            ("authorization", "Bearer CALLER"),
            ("ocp-apim-subscription-key", "APIM"),
        ];
        for id in b.ids() {
            let mut p = parts(
                "https://orig.example/openai/deployments/d/chat/completions",
                &incoming,
            );
            b.rewrite(id, &mut p, None).unwrap();
            let host = p.uri.host().unwrap().to_owned();
            let all: Vec<_> = p
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            for value in ["CALLER-KEY", "Bearer CALLER", "APIM"] {
                assert!(!p.headers.iter().any(|(_, v)| v == value), "{all:?}");
            }
            match host.as_str() {
                "east.example.com" => {
                    assert_eq!(p.headers["api-key"], "EAST-KEY");
                    assert!(!p.headers.contains_key("authorization"));
                    assert!(p.headers["api-key"].is_sensitive());
                }
                "apim.example.net" => {
                    assert_eq!(p.headers["authorization"], "Bearer WEST-TOKEN");
                    assert!(!p.headers.contains_key("api-key"));
                }
                other => panic!("unexpected host {other}"),
            }
        }
    }
}
