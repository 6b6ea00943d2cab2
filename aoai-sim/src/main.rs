//! `aoai-sim`: serve a scenario over HTTP, check a scenario file, or run its workload in virtual
//! time.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use aoai_sim::driver::{self, NaiveClient, RetryClient};
use aoai_sim::{Scenario, ServeOptions, Server};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "aoai-sim", about = "An Azure OpenAI simulator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the scenario on 127.0.0.1 until SIGINT or SIGTERM.
    Serve {
        /// The scenario file (TOML).
        #[arg(long)]
        scenario: PathBuf,
        /// The port (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// How much faster than real time the simulated clock runs (delays in headers are
        /// divided by it, rate limits multiplied: headers are in real time).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Validate a scenario file.
    Check {
        /// The scenario file (TOML).
        file: PathBuf,
    },
    /// Run the scenario's workload in virtual time with a baseline client and print the report.
    Run {
        /// The scenario file (TOML).
        file: PathBuf,
        /// The client policy.
        #[arg(long, value_enum, default_value_t = ClientKind::Naive)]
        client: ClientKind,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ClientKind {
    /// The openai SDK's retry loop.
    Naive,
    /// tower-aoai's RetryPolicy + RetryBudget.
    Retry,
}

fn load(path: &PathBuf) -> Result<Scenario, ExitCode> {
    Scenario::load(path).map_err(|e| {
        eprintln!("{}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => match load(&file) {
            Ok(s) => {
                println!(
                    "{}: ok ({} regions, {} resources, {} events{})",
                    file.display(),
                    s.regions.len(),
                    s.resources.len(),
                    s.events.len(),
                    if s.workload.is_some() {
                        ", workload"
                    } else {
                        ""
                    }
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { file, client } => {
            let scenario = match load(&file) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let result = match client {
                ClientKind::Naive => driver::run(&scenario, &mut NaiveClient::new(scenario.seed)),
                ClientKind::Retry => driver::run(&scenario, &mut RetryClient::new(scenario.seed)),
            };
            match result {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve {
            scenario,
            port,
            time_scale,
            threads,
        } => {
            let parsed = match load(&scenario) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let options = ServeOptions {
                port,
                time_scale,
                threads,
            };
            let server = match Server::start(&parsed, options) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("aoai-sim: {e}");
                    return ExitCode::from(1);
                }
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {}", server.base_url());
            for r in &parsed.resources {
                if let Some(url) = server.resource_url(&r.name) {
                    let _ = writeln!(out, "resource {} ({}) at {url}", r.name, r.region);
                }
            }
            let _ = out.flush();
            drop(out);
            wait_for_signal();
            server.stop();
            ExitCode::SUCCESS
        }
    }
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                let _ = tokio::signal::ctrl_c().await;
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    });
}
