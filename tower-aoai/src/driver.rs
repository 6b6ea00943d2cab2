//! What every tower driver in this crate needs from the runtime, written once.

use std::time::Instant;

use crate::policy::classify::TransportError;

/// The current instant on tokio's clock (paused and advanced in tests), as the core takes it.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What kind of transport failure an inner service's error is: a timeout if any error in its
/// source chain is a tokio or tower `Elapsed` or an I/O `TimedOut`, else a connection failure.
pub(crate) fn transport_error(error: &(dyn std::error::Error + 'static)) -> TransportError {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
            return TransportError::Timeout;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return TransportError::Timeout;
        }
        cur = e.source();
    }
    TransportError::Connect
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that names its cause as its source, as client errors wrapping I/O errors do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn timeouts_are_found_anywhere_in_the_source_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert_eq!(transport_error(&io), TransportError::Timeout);
        assert_eq!(transport_error(&Wrapped(io)), TransportError::Timeout);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "no");
        assert_eq!(transport_error(&refused), TransportError::Connect);
    }
}
