//! The adaptive concurrency limit (issue 4; being built).
