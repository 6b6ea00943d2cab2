use std::fmt;

/// A configuration value was rejected at construction time.
///
/// The message names the offending field, so a user can find it in their own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    index: Option<usize>,
    reason: String,
}

impl ConfigError {
    /// A rejected `field` and why it was rejected.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            index: None,
            reason: reason.into(),
        }
    }

    /// The same error for the `index`-th element of a list (`backends.endpoint` at 2 reads
    /// `backends[2].endpoint`).
    pub fn at_index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// The name of the field that was rejected, without a list index (`backends.endpoint`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// The position in a list of the element whose field was rejected, if any.
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    /// The full path of the rejected field, with its list index (`backends[2].endpoint`).
    pub fn path(&self) -> String {
        match self.index {
            None => self.field.to_owned(),
            Some(i) => match self.field.split_once('.') {
                Some((list, rest)) => format!("{list}[{i}].{rest}"),
                None => format!("{}[{i}]", self.field),
            },
        }
    }

    /// Why the field was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.path(), self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The most attempts a call may make, for the retry policy and the router alike.
pub(crate) const MAX_ATTEMPTS: u32 = 100;

/// Checks an attempt count: 1 to [`MAX_ATTEMPTS`]; else an error naming `field`.
pub(crate) fn check_attempts(field: &'static str, attempts: u32) -> Result<u32, ConfigError> {
    if attempts == 0 || attempts > MAX_ATTEMPTS {
        return Err(ConfigError::new(
            field,
            format!("must be between 1 and {MAX_ATTEMPTS}, got {attempts}"),
        ));
    }
    Ok(attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_the_list_element() {
        let err = ConfigError::new("backends.endpoint", "bad URL").at_index(2);
        assert_eq!(err.field(), "backends.endpoint");
        assert_eq!(err.path(), "backends[2].endpoint");
        assert_eq!(err.to_string(), "invalid `backends[2].endpoint`: bad URL");
        assert_eq!(ConfigError::new("max_wait", "x").path(), "max_wait");
    }
}
