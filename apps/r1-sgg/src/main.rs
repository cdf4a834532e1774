//! The `r1-sgg` command line (see the library's docs, `r1_sgg`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    match r1_sgg::cli::run(r1_sgg::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Every cause, as sentences: "reading X: no such file".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
