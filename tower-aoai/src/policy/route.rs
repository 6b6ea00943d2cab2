//! Backend choice, cooldowns, breakers and hedging decisions (issue 5; being built).
