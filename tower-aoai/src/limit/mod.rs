//! AdaptiveConcurrencyLayer (issue 4; being built).
