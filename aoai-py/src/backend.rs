//! `tower_aoai.Backend`: one place a request can be served, as a Python value.
//!
//! Only holds what the user gave; [`crate::engine::Engine`] turns a list of them into the core's
//! checked `Backends` (which validates and names the bad field). `repr()` never shows a secret.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tower_aoai::policy::route;

/// Where a Python token provider's last exception is kept until the driver can raise it (the
/// core's provider signature cannot fail).
pub(crate) type ProviderError = Arc<Mutex<Option<PyErr>>>;

/// One Azure OpenAI deployment (or OpenAI-compatible endpoint) a transport may send to.
#[pyclass(frozen, module = "tower_aoai._core")]
pub struct Backend {
    name: String,
    endpoint: String,
    deployment: Option<String>,
    region: Option<String>,
    api_key: Option<String>,
    token_provider: Option<Py<PyAny>>,
    tier: u8,
    weight: u32,
    rpm: Option<f64>,
    tpm: Option<f64>,
}

#[pymethods]
impl Backend {
    #[new]
    #[pyo3(signature = (
        name, endpoint, *, deployment = None, region = None, api_key = None,
        token_provider = None, tier = 1, weight = 1, rpm = None, tpm = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        endpoint: String,
        deployment: Option<String>,
        region: Option<String>,
        api_key: Option<String>,
        token_provider: Option<Bound<'_, PyAny>>,
        tier: u8,
        weight: u32,
        rpm: Option<f64>,
        tpm: Option<f64>,
    ) -> PyResult<Self> {
        if api_key.is_some() && token_provider.is_some() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "invalid `token_provider`: give either `api_key` or `token_provider`, not both",
            ));
        }
        if let Some(p) = &token_provider
            && !p.is_callable()
        {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "invalid `token_provider`: must be a callable returning a bearer token",
            ));
        }
        Ok(Self {
            name,
            endpoint,
            deployment,
            region,
            api_key,
            token_provider: token_provider.map(Bound::unbind),
            tier,
            weight,
            rpm,
            tpm,
        })
    }

    /// The backend's name (unique in its list; used in logs and stats).
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The endpoint (`https://<resource>.openai.azure.com`).
    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The deployment requests are rewritten to, if any.
    #[getter]
    fn deployment(&self) -> Option<&str> {
        self.deployment.as_deref()
    }

    /// The region label.
    #[getter]
    fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// The preference group (lower first).
    #[getter]
    fn tier(&self) -> u8 {
        self.tier
    }

    /// The share of traffic within the tier.
    #[getter]
    fn weight(&self) -> u32 {
        self.weight
    }

    /// The deployment's known requests-per-minute quota.
    #[getter]
    fn rpm(&self) -> Option<f64> {
        self.rpm
    }

    /// The deployment's known tokens-per-minute quota.
    #[getter]
    fn tpm(&self) -> Option<f64> {
        self.tpm
    }

    fn __repr__(&self) -> String {
        let opt = |v: &Option<String>| {
            v.as_ref()
                .map_or_else(|| "None".to_owned(), |s| format!("{s:?}"))
        };
        let num = |v: Option<f64>| v.map_or_else(|| "None".to_owned(), |x| format!("{x:?}"));
        let auth = match (&self.api_key, &self.token_provider) {
            (Some(_), _) => ", api_key=<redacted>",
            (_, Some(_)) => ", token_provider=<provider>",
            _ => "",
        };
        format!(
            "Backend({:?}, {:?}, deployment={}, region={}{auth}, tier={}, weight={}, rpm={}, tpm={})",
            self.name,
            self.endpoint,
            opt(&self.deployment),
            opt(&self.region),
            self.tier,
            self.weight,
            num(self.rpm),
            num(self.tpm),
        )
    }
}

impl Backend {
    /// The core's backend; a token provider is wrapped to call the Python callable with the GIL,
    /// keeping its exception in `errors` for the driver to raise.
    pub(crate) fn to_core(&self, py: Python<'_>, errors: &ProviderError) -> route::Backend {
        let mut b = route::Backend::new(self.name.clone(), self.endpoint.clone())
            .with_tier(self.tier)
            .with_weight(self.weight);
        if let Some(d) = &self.deployment {
            b = b.with_deployment(d.clone());
        }
        if let Some(r) = &self.region {
            b = b.with_region(r.clone());
        }
        if let Some(k) = &self.api_key {
            b = b.with_api_key(k.clone());
        }
        if let Some(provider) = &self.token_provider {
            let provider = provider.clone_ref(py);
            let errors = errors.clone();
            b = b.with_token_provider(move || {
                Python::attach(|py| {
                    match provider
                        .call0(py)
                        .and_then(|token| token.extract::<String>(py))
                    {
                        Ok(token) => token,
                        Err(err) => {
                            *errors.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                            // Not a valid header value: the rewrite fails and the driver raises
                            // the provider's exception.
                            "\n".to_owned()
                        }
                    }
                })
            });
        }
        b
    }

    pub(crate) fn name_str(&self) -> &str {
        &self.name
    }

    pub(crate) fn quotas(&self) -> (Option<f64>, Option<f64>) {
        (self.rpm, self.tpm)
    }
}
