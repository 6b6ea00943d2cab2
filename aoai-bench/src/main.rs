//! `aoai-bench`: the Rust side of tower-aoai's benchmarks.
//!
//! - `schedule`: a scenario's workload (arrivals, targets, body) and its capacity lower bound as
//!   JSON, so every contender of `bench/goodput.py` runs the same calls.
//! - `goodput`: runs that workload through tower-aoai's full Rust stack over a hyper client
//!   against a running simulator; prints per-call results as JSON.
//! - `overhead`: a bare hyper client against tower-aoai's layers over the same client, on
//!   loopback against a zero-latency server, in one run; prints a table (or JSON).
//! - `queue`: a burst of N concurrent calls through a limit of 4, the `Stack` against a bare
//!   client behind a semaphore, in one run; prints a table.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod goodput;
mod overhead;
mod queue;
mod schedule;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aoai_sim::Scenario;
use clap::{Parser, Subcommand};

use crate::schedule::Schedule;

#[derive(Parser)]
#[command(name = "aoai-bench", about = "tower-aoai benchmarks", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a scenario's workload and lower bound as JSON.
    Schedule {
        /// The scenario file (TOML).
        #[arg(long)]
        scenario: PathBuf,
        /// Keep only the first this many virtual seconds of arrivals.
        #[arg(long)]
        duration: Option<f64>,
        /// Send to these `resource/deployment` targets instead of the workload's (in order).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
    },
    /// Run a scenario's workload through the full Rust stack against a running simulator.
    Goodput {
        /// The scenario file (TOML) the simulator serves.
        #[arg(long)]
        scenario: PathBuf,
        /// The simulator's base URL (`listening on ...`).
        #[arg(long)]
        server: String,
        /// The simulator's `--time-scale`.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Keep only the first this many virtual seconds of arrivals.
        #[arg(long)]
        duration: Option<f64>,
        /// Send to these `resource/deployment` targets instead of the workload's (in order).
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// The longest one call may take, in real seconds.
        #[arg(long, default_value_t = 300.0)]
        call_timeout: f64,
        /// Seeds the stack's random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Per-request overhead of the layers against a bare hyper client, on loopback.
    Overhead {
        /// Requests per variant per round.
        #[arg(long, default_value_t = 2_000)]
        requests: usize,
        /// Interleaved rounds, in a rotating order (the medians count; the overhead is paired
        /// per round with the bare client).
        #[arg(long, default_value_t = 101)]
        rounds: usize,
        /// Concurrent callers (several values run one after the other).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Run only the variant of this name, or else the variants whose name contains this (and
        /// the bare client).
        #[arg(long)]
        only: Option<String>,
    },
    /// A burst of N concurrent calls through a limit of 4: the Stack's queue against a bare
    /// client behind a semaphore, side by side.
    Queue {
        /// Burst sizes (concurrent calls), one after the other.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        calls: Vec<usize>,
    },
    /// Serve the overhead run's zero-latency answer on 127.0.0.1 until stdin closes (for
    /// `bench/overhead.py`); prints `listening on http://127.0.0.1:PORT`.
    ServeZero,
}

fn load(path: &PathBuf, duration: Option<f64>, targets: &[String]) -> Result<Schedule, String> {
    let scenario = Scenario::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Schedule::from_scenario(&scenario, duration, targets)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aoai-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Schedule {
            scenario,
            duration,
            targets,
        } => {
            let schedule = load(&scenario, duration, &targets)?;
            println!("{}", schedule.to_json());
        }
        Command::Goodput {
            scenario,
            server,
            time_scale,
            duration,
            targets,
            call_timeout,
            seed,
        } => {
            if !(time_scale.is_finite() && time_scale > 0.0) {
                return Err(format!("--time-scale must be positive, got {time_scale}"));
            }
            if !(call_timeout.is_finite() && call_timeout > 0.0 && call_timeout < 86_400.0) {
                return Err(format!(
                    "--call-timeout must be in (0, 86400), got {call_timeout}"
                ));
            }
            let schedule = load(&scenario, duration, &targets)?;
            let options = goodput::Options {
                server,
                time_scale,
                call_timeout: Duration::from_secs_f64(call_timeout),
                seed,
            };
            let result = runtime()?
                .block_on(goodput::run(&schedule, &options))
                .map_err(|e| format!("goodput: {e}"))?;
            println!("{result}");
        }
        Command::Overhead {
            requests,
            rounds,
            concurrency,
            json,
            only,
        } => {
            let only: Option<&'static str> = only.map(|s| &*Box::leak(s.into_boxed_str()));
            if requests == 0 || rounds == 0 || concurrency.iter().any(|c| *c == 0 || *c > 1024) {
                return Err(
                    "--requests, --rounds and --concurrency must be positive (concurrency <= 1024)"
                        .into(),
                );
            }
            let mut runs = Vec::new();
            for c in concurrency {
                let options = overhead::Options {
                    requests,
                    rounds,
                    concurrency: c,
                    only,
                };
                runs.push(overhead::run(options).map_err(|e| format!("overhead: {e}"))?);
            }
            if json {
                println!("{}", serde_json::Value::Array(runs));
            } else {
                for run in &runs {
                    print_overhead(run);
                }
            }
        }
        Command::Queue { calls } => {
            if calls.iter().any(|c| *c == 0 || *c > 1_000_000) {
                return Err("--calls must be in 1..=1000000".into());
            }
            queue::run(&calls).map_err(|e| format!("queue: {e}"))?;
        }
        Command::ServeZero => {
            let rt = runtime()?;
            let addr = rt
                .block_on(overhead::serve())
                .map_err(|e| format!("serve: {e}"))?;
            println!("listening on http://{addr}");
            // Serve until the parent closes our stdin (or kills us).
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            drop(rt);
        }
    }
    Ok(())
}

/// An overhead ratio with its spread, in percent: "4.1 % (2.9–5.3)" (median and quartiles of the
/// per-round ratios); "?" if the row has no such figure.
fn spread(row: &serde_json::Value, key: &str) -> String {
    let pct = |k: &str| row[k].as_f64().map(|v| v * 100.0);
    match (
        pct(key),
        pct(&format!("{key}_q1")),
        pct(&format!("{key}_q3")),
    ) {
        (Some(m), Some(q1), Some(q3)) => format!("{m:.1} % ({q1:.1}–{q3:.1})"),
        (Some(m), _, _) => format!("{m:.1} %"),
        _ => "?".into(),
    }
}

fn print_overhead(run: &serde_json::Value) {
    println!(
        "concurrency {} · {} requests x {} rounds per variant, rotating order · medians; overhead paired per round with the bare client (quartiles in brackets) · zero-latency hyper server on 127.0.0.1",
        run["concurrency"], run["requests"], run["rounds"]
    );
    println!(
        "{:<40} {:>11} {:>11} {:>9} {:>22} | {:>11} {:>9} {:>22}",
        "variant",
        "wall µs/req",
        "requests/s",
        "added µs",
        "overhead",
        "client CPU",
        "added µs",
        "overhead"
    );
    for row in run["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<40} {:>11.2} {:>11.0} {:>9.2} {:>22} | {:>11.2} {:>9.2} {:>22}",
            row["variant"].as_str().unwrap_or("?"),
            f("us_per_request"),
            f("requests_per_s"),
            f("added_us"),
            spread(row, "overhead_ratio"),
            f("cpu_us_per_request"),
            f("cpu_added_us"),
            spread(row, "cpu_overhead_ratio"),
        );
    }
    println!();
}
