//! `aoai-sim`: the Azure OpenAI simulator's command line (being built).

fn main() {}
