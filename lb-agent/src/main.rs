//! lb-agent's binary: parses the command line and runs the library's command.

use std::process::ExitCode;

use clap::Parser as _;
use lb_agent::{
    cli::{Cli, Command},
    dataplane, list, logging, run,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);

    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::List { pin_dir, output } => list::list(&pin_dir, output),
        Command::Reset { pin_dir } => dataplane::bpf::reset(&pin_dir).map(|removed| {
            if removed.is_empty() {
                eprintln!("nothing to remove under {}", pin_dir.display());
            }
            for path in removed {
                eprintln!("removed {}", path.display());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
