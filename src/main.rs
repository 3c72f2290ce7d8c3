//! The `punix` binary: parse the command line, run one command, map the
//! error to an exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    punix::trace::mark("start");
    let args = cli::parse();
    let r = cli::run(args);
    punix::trace::mark("returned");
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
