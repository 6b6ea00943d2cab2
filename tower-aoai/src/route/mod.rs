//! Routing, failover and hedging layer (issue 5; being built).
