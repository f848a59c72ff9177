//! The `vmm` binary: a thin layer over the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vmm::bench::{self, BenchConfig};
use vmm::cli::{Cli, Command};
use vmm::config::{RunConfig, SupervisorConfig};
use vmm::runner;

/// Exit codes: 0 every guest ended cleanly, 1 some guest did not, 2 the
/// VMM could not start its guests (bad input or host problem) or a bench
/// could not finish.
const EXIT_GUEST_FAILED: u8 = 1;
const EXIT_SETUP_FAILED: u8 = 2;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(std::io::stderr(), "[vmm {}] {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// The guest process's own command line, as the supervisor writes it
/// (`vmm --log-level LEVEL guest`), read without clap: building the whole
/// CLI touched about 40 KiB of heap that every guest process then kept,
/// against a clone's budget of 1 MiB.
fn guest_process_log_level() -> Option<log::LevelFilter> {
    let args: Vec<_> = std::env::args_os().skip(1).take(4).collect();
    match args.as_slice() {
        [flag, level, command] if flag == "--log-level" && command == "guest" => level.to_str()?.parse().ok(),
        _ => None,
    }
}

fn main() -> ExitCode {
    if let Some(level) = guest_process_log_level() {
        log::set_max_level(level);
        let _ = log::set_logger(&StderrLogger);
        return vmm::guest::process::main();
    }
    let cli = Cli::parse();
    log::set_max_level(cli.log_level);
    let _ = log::set_logger(&StderrLogger);
    let result = match cli.command {
        Command::Run(args) => RunConfig::try_from(args)
            .and_then(|config| runner::run(&config))
            .map(|r| r.all_clean())
            .map_err(String::from),
        Command::Serve(args) => {
            let socket = args.api_socket.clone();
            SupervisorConfig::try_from(args)
                .and_then(|config| vmm::api::serve(&socket, config))
                .map(|()| true)
                .map_err(String::from)
        }
        Command::Guest => return vmm::guest::process::main(),
        Command::ApiSpec => {
            println!("{}", vmm::api::routes::openapi_json());
            Ok(true)
        }
        Command::Ctl(args) => vmm::ctl::run(args),
        Command::Snapshot(args) => vmm::ctl::run(args.into()),
        Command::Bench(args) if args.net => {
            let config = bench::net::NetBenchConfig {
                guest_counts: args.net_guests.clone(),
                memory_mib: 32,
                memtest: args.images_dir.join("memtest"),
            };
            bench::net::run(&config).map(|results| {
                println!("{}", bench::net::table(&results));
                if let Some(path) = &args.json {
                    let _ = std::fs::write(path, serde_json::to_vec_pretty(&results).unwrap_or_default());
                }
                true
            })
        }
        Command::Bench(args) => BenchConfig::try_from(args).and_then(|config| bench::run(&config)).map(|report| {
            println!("{}", report.table());
            report.failures() == 0
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_GUEST_FAILED),
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}
