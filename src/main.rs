use clap::Parser;
use pbx_operator::cli::{Cli, Command};
use pbx_operator::{api, controllers, telemetry};
use std::process::ExitCode;

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
