use clap::Parser;
use pbx_operator::cli::{Cli, Command};
use pbx_operator::{api, controllers, telemetry};
use std::process::ExitCode;

/// Keeps the operator's peak memory to what it holds at once. glibc raises its mmap threshold to
/// the largest block freed (up to 32 MiB), after which a run's megabyte buffers (a batch's rows,
/// their JSON and gzip, its SQL) come from arenas that keep their pages, one arena per thread:
/// peak RSS then grew with the number of batches. A fixed threshold keeps such buffers mmapped
/// and returned when freed; two arenas are plenty for a process that mostly waits on I/O.
/// Smaller blocks freed inside an arena keep their pages until trimmed: a batch's many small
/// rows and strings left a few MiB of free but resident pages per batch, so peak RSS still grew
/// with a run's length. A trim every second hands those pages back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before the work starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                // SAFETY: malloc_trim only returns free pages to the kernel; it takes the
                // arenas' locks itself.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        })
        .expect("starting the malloc-trim thread");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_malloc() {}

#[tokio::main]
async fn main() -> ExitCode {
    bound_malloc();
    // Installed as `kubectl-pbx` (a symlink or copy), the binary is the kubectl plugin.
    if pbx_operator::kubectl::invoked_as_plugin() {
        return pbx_operator::kubectl::main().await;
    }
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let outcome = match cli.command {
        Command::Crds(args) => pbx_operator::cli::print_crds(&api::crds(), args.out_dir.as_deref()),
        Command::Run(args) => controllers::run(args.into()).await.map_err(Into::into),
        Command::Results(args) => pbx_operator::cli::print_results(&args).await,
        Command::Create(pbx_operator::cli::CreateCommand::PhoneRestart(args)) => {
            pbx_operator::cli::create_phone_restart(&args).await
        }
        Command::Export(pbx_operator::cli::ExportCommand::Users(args)) => {
            pbx_operator::cli::export_users(&args).await
        }
        Command::History(args) => pbx_operator::history::print_history(&args).await,
        Command::Revert(args) => pbx_operator::cli::revert::revert(&args).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
