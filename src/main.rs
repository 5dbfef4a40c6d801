use clap::Parser;
use pbx_operator::cli::{Cli, Command};
use pbx_operator::{api, controllers, telemetry};
use std::process::ExitCode;

/// The operator's allocator is jemalloc, set up so peak memory is what the operator holds at
/// once, not what it held over a run. With glibc's malloc the peak grew with a run's length and
/// varied by 15% from one run to the next: a batch's megabyte buffers (rows, JSON, gzip, SQL)
/// and many small strings left free but resident pages in per-thread arenas, handed back only
/// when a timed `malloc_trim` came round. jemalloc keeps small blocks in size-classed slabs (a
/// batch's strings do not pin each other's pages) and its background thread returns freed
/// pages at once (`dirty_decay_ms:0`); two arenas are plenty for a process that mostly waits
/// on I/O.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(not(target_env = "msvc"))]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static, immutable C string.
#[cfg(not(target_env = "msvc"))]
unsafe impl Sync for MallocConf {}

/// Read by jemalloc when it starts, before `main`.
#[cfg(not(target_env = "msvc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,narenas:2,dirty_decay_ms:0,muzzy_decay_ms:0".as_ptr());

#[tokio::main]
async fn main() -> ExitCode {
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
