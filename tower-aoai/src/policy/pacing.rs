//! Request and token pacing (GCRA) per backend (issue 4; being built).
