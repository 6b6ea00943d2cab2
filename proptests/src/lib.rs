//! Property tests of the policy core live in `tests/`.
