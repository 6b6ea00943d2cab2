//! Azure OpenAI simulator (being built).
