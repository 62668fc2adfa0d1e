//! The hidden flags every binary has, `--generate-completions SHELL` and
//! `--generate-man DIR`: the shell completions and man pages come from the
//! same clap definition as the parser, so they cannot drift from it. The
//! Dockerfile runs them at build time and installs what they write.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Arg, ArgMatches, Command, CommandFactory, value_parser};
use clap_complete::Shell;

const COMPLETIONS: &str = "generate_completions";
const MAN: &str = "generate_man";

/// Set while the command is built for writing completions or man pages:
/// the two flags then leave themselves out (clap_complete lists hidden
/// flags too, and clap cannot remove an argument once added).
static WRITING: AtomicBool = AtomicBool::new(false);

/// Flatten into a binary's arguments (`#[command(flatten)]`) and call
/// [`Generate::run`] first thing after parsing.
#[derive(Debug, Default)]
pub struct Generate {
    completions: Option<Shell>,
    man: Option<PathBuf>,
}

impl clap::Args for Generate {
    fn augment_args(command: Command) -> Command {
        if WRITING.load(Ordering::SeqCst) {
            return command;
        }
        command
            .arg(
                Arg::new(COMPLETIONS)
                    .long("generate-completions")
                    .value_name("SHELL")
                    .value_parser(value_parser!(Shell))
                    .help("Print the completion script for SHELL and exit")
                    .hide(true)
                    .exclusive(true),
            )
            .arg(
                Arg::new(MAN)
                    .long("generate-man")
                    .value_name("DIR")
                    .value_parser(value_parser!(PathBuf))
                    .help("Write the man pages (one per command and subcommand) into DIR and exit")
                    .hide(true)
                    .exclusive(true),
            )
    }

    fn augment_args_for_update(command: Command) -> Command {
        Generate::augment_args(command)
    }
}

impl clap::FromArgMatches for Generate {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Generate, clap::Error> {
        Ok(Generate {
            completions: matches.try_get_one::<Shell>(COMPLETIONS).ok().flatten().copied(),
            man: matches.try_get_one::<PathBuf>(MAN).ok().flatten().cloned(),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Generate::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Generate {
    /// Writes what was asked for, if anything: then the binary exits with
    /// the returned status.
    pub fn run<A: CommandFactory>(&self) -> Option<ExitCode> {
        if self.completions.is_none() && self.man.is_none() {
            return None;
        }
        WRITING.store(true, Ordering::SeqCst);
        let mut command = A::command();
        let name = command.get_name().to_owned();
        if let Some(shell) = self.completions {
            // Into memory first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, name, &mut script);
            super::write_stdout(&script);
            return Some(ExitCode::SUCCESS);
        }
        let dir = self.man.as_ref()?;
        Some(match clap_mangen::generate_to(command, dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: cannot write man pages to {}: {e}", dir.display());
                ExitCode::from(super::EXIT_RUNTIME)
            }
        })
    }
}
