//! `kubectl pbx`: the same binary run as `kubectl-pbx` (a symlink or a copy under that name on
//! PATH) is a kubectl plugin: plan, approve, wait, status, results, revert, export, create.
//!
//! [`format`] is what it prints (pure, unit-tested); [`ops`] reads and patches the resources.

pub mod complete;
pub mod format;
pub mod ops;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use kube::core::ApiResource;

use crate::api::{BulkPhoneChange, BulkUserChange, PhoneRestart, UserRecycle};

/// The program name that makes the binary a kubectl plugin.
pub const PLUGIN_NAME: &str = "kubectl-pbx";

/// Whether the binary was started as `kubectl-pbx` (argv[0], a symlink's own name included).
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| {
            n == PLUGIN_NAME || n.starts_with("kubectl-pbx.") || n == complete::COMPLETE_NAME
        })
}

fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

#[derive(Parser, Debug)]
#[command(
    name = PLUGIN_NAME,
    version,
    override_usage = "kubectl pbx [-n NAMESPACE] [--context CONTEXT] [--kubeconfig FILE] <COMMAND>",
    about = "Review, approve and follow pbx-operator changes from kubectl",
    long_about = "Review, approve and follow pbx-operator changes from kubectl.\n\n\
Resources are <kind>/<name>, kind being bulkuserchange (buc), bulkphonechange (bpc), \
phonerestart (prs) or userrecycle (urc).\n\nExample: kubectl pbx plan buc/q4-numbers -n acme, \
then kubectl pbx approve buc/q4-numbers -n acme, then kubectl pbx wait buc/q4-numbers -n acme."
)]
pub struct Plugin {
    /// Namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
    Csv,
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Show a change's plan: targets, each field from -> to, closed fields, common values,
    /// warnings, and the plan hash.
    Plan {
        /// buc/NAME or bpc/NAME (any kind/NAME works).
        target: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show the plan, ask, then set mode Execute and approvedPlanHash in one patch; refuses when
    /// the plan changed since it was shown.
    Approve {
        /// buc/NAME or bpc/NAME.
        target: String,
        /// Do not ask.
        #[arg(short = 'y', long)]
        yes: bool,
        /// The plan hash you reviewed (from `kubectl pbx plan`): refuse unless it is still the plan.
        #[arg(long)]
        hash: Option<String>,
    },
    /// Follow a run with a progress bar until it ends; exits 1 when it ends Failed,
    /// PartiallyFailed or Expired, 2 on --timeout.
    Wait {
        target: String,
        /// Give up after this long (e.g. 10m); default: wait as long as it takes.
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<std::time::Duration>,
    },
    /// Every operation of the namespace: phase, progress and age.
    Status {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print the full result CSV of an operation (every target).
    Results { target: String },
    /// Print the change that undoes a finished buc/bpc/urc (for a GitOps commit); --apply creates it.
    Revert {
        target: String,
        /// Create the revert instead of printing it.
        #[arg(long)]
        apply: bool,
        /// Create it in mode Execute (default Validate: review its plan, then approve it).
        #[arg(long)]
        execute: bool,
    },
    /// Export from a PBX as CSV.
    #[command(subcommand)]
    Export(PluginExport),
    /// Create resources from templates.
    #[command(subcommand)]
    Create(PluginCreate),
    /// Print a shell completion script: `source <(kubectl-pbx completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
}

#[derive(Subcommand, Debug)]
pub enum PluginExport {
    /// Every user as a CSV a BulkUserChange's spec.source.csv takes back.
    Users(PluginExportUsers),
}

#[derive(Args, Debug)]
pub struct PluginExportUsers {
    /// The PbxConnection: NAME (in -n's namespace) or NAMESPACE/NAME.
    #[arg(long)]
    pub connection: Option<String>,
    /// Read the database directly instead, without Kubernetes (with --domain).
    #[arg(long, env = "PBX_DATABASE_URL", requires = "domain")]
    pub database_url: Option<String>,
    #[arg(long)]
    pub domain: Option<String>,
    /// The header only.
    #[arg(long)]
    pub template: bool,
}

#[derive(Subcommand, Debug)]
pub enum PluginCreate {
    /// A PhoneRestart from a template, named after its scheduled time.
    PhoneRestart(PluginPhoneRestart),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("template").required(true).args(["from", "from_configmap"])))]
pub struct PluginPhoneRestart {
    #[arg(long)]
    pub from: Option<PathBuf>,
    #[arg(long)]
    pub from_configmap: Option<String>,
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long, value_parser = parse_duration_arg)]
    pub window: Option<std::time::Duration>,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::api::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 30s, 5m or 1h"))
}

/// The operation kinds, as kubectl names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    UserChange,
    PhoneChange,
    Restart,
    Recycle,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::UserChange,
        Kind::PhoneChange,
        Kind::Restart,
        Kind::Recycle,
    ];

    /// `buc`, `bulkuserchange`, `bulkuserchanges`, `BulkUserChange`,
    /// `bulkuserchanges.pbx-operator.io` ...
    pub fn parse(text: &str) -> Option<Kind> {
        let t = text.to_ascii_lowercase();
        let t = t.strip_suffix(".pbx-operator.io").unwrap_or(&t);
        Kind::ALL
            .into_iter()
            .find(|k| t == k.short() || t == k.singular() || t == format!("{}s", k.singular()))
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::UserChange => "bulkuserchange",
            Kind::PhoneChange => "bulkphonechange",
            Kind::Restart => "phonerestart",
            Kind::Recycle => "userrecycle",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Kind::UserChange => "buc",
            Kind::PhoneChange => "bpc",
            Kind::Restart => "prs",
            Kind::Recycle => "urc",
        }
    }

    pub fn resource(self) -> ApiResource {
        match self {
            Kind::UserChange => ApiResource::erase::<BulkUserChange>(&()),
            Kind::PhoneChange => ApiResource::erase::<BulkPhoneChange>(&()),
            Kind::Restart => ApiResource::erase::<PhoneRestart>(&()),
            Kind::Recycle => ApiResource::erase::<UserRecycle>(&()),
        }
    }

    /// Kinds with a plan to approve (mode Validate / Execute, approvedPlanHash).
    pub fn approvable(self) -> bool {
        matches!(self, Kind::UserChange | Kind::PhoneChange)
    }

    /// Kinds a revert can undo (a restart cannot be undone).
    pub fn revertible(self) -> bool {
        self != Kind::Restart
    }
}

/// `buc/NAME` into its kind and name.
pub fn parse_target(text: &str) -> Result<(Kind, String), ops::PluginError> {
    let usage = || {
        ops::PluginError::Usage(format!(
            "expected <kind>/<name> such as buc/q4-numbers, got {text:?}; kinds: bulkuserchange (buc), bulkphonechange (bpc), phonerestart (prs), userrecycle (urc)"
        ))
    };
    let (kind, name) = text.split_once('/').ok_or_else(usage)?;
    let kind = Kind::parse(kind).ok_or_else(usage)?;
    if name.is_empty() || name.contains('/') {
        return Err(usage());
    }
    Ok((kind, name.to_string()))
}

/// Which kubeconfig and context every Kubernetes call of this process uses: the plugin sets it
/// from --kubeconfig / --context; unset, it is what `kubectl` would use.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

static CLIENT_OPTIONS: OnceLock<ClientOptions> = OnceLock::new();

/// Sets the kubeconfig and context for [`client`] (once, before the first call).
pub fn set_client_options(options: ClientOptions) {
    let _ = CLIENT_OPTIONS.set(options);
}

/// A client for the chosen kubeconfig and context; without options, `Client::try_default`
/// (in-cluster service account, or $KUBECONFIG).
pub async fn client() -> Result<kube::Client, kube::Error> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = CLIENT_OPTIONS.get().cloned().unwrap_or_default();
    if options.kubeconfig.is_none() && options.context.is_none() {
        return kube::Client::try_default().await;
    }
    let kc_options = KubeConfigOptions {
        context: options.context.clone(),
        ..Default::default()
    };
    let config = match &options.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &kc_options).await?
        }
        None => kube::Config::from_kubeconfig(&kc_options).await?,
    };
    kube::Client::try_from(config)
}

/// Entry point of `kubectl-pbx`.
pub async fn main() -> ExitCode {
    // `kubectl pbx <TAB>`: kubectl runs kubectl_complete-pbx with the words typed so far;
    // `kubectl-pbx __complete ...` does the same.
    let words: Vec<String> = std::env::args().skip(1).collect();
    if program_name() == complete::COMPLETE_NAME {
        complete::complete(&words).await;
        return ExitCode::SUCCESS;
    }
    if words.first().map(String::as_str) == Some("__complete") {
        complete::complete(&words[1..]).await;
        return ExitCode::SUCCESS;
    }
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(first) = args.first_mut() {
        *first = PLUGIN_NAME.into();
    }
    let plugin = Plugin::parse_from(args);
    set_client_options(ClientOptions {
        kubeconfig: plugin.kubeconfig.clone(),
        context: plugin.context.clone(),
    });
    match run(plugin).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(plugin: Plugin) -> Result<ExitCode, ops::PluginError> {
    let ns = plugin.namespace.clone();
    match plugin.command {
        PluginCommand::Completion { shell } => {
            let mut cmd = Plugin::command();
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
            };
            clap_complete::generate(shell, &mut cmd, PLUGIN_NAME, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Plan { target, output } => {
            let (kind, name) = parse_target(&target)?;
            ops::plan(ns, kind, &name, output).await
        }
        PluginCommand::Approve { target, yes, hash } => {
            let (kind, name) = parse_target(&target)?;
            ops::approve(ns, kind, &name, yes, hash).await
        }
        PluginCommand::Wait { target, timeout } => {
            let (kind, name) = parse_target(&target)?;
            ops::wait(ns, kind, &name, timeout).await
        }
        PluginCommand::Status {
            all_namespaces,
            output,
        } => ops::status(ns, all_namespaces, output).await,
        PluginCommand::Results { target } => {
            let (kind, name) = parse_target(&target)?;
            let args = crate::cli::ResultsArgs {
                target: format!("{}/{name}", kind.singular()),
                namespace: ns,
            };
            crate::cli::print_results(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Revert {
            target,
            apply,
            execute,
        } => {
            let (kind, name) = parse_target(&target)?;
            let args = crate::cli::revert::RevertArgs {
                target: format!("{}/{name}", kind.singular()),
                namespace: ns,
                apply,
                execute,
            };
            crate::cli::revert::revert(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Export(PluginExport::Users(a)) => {
            let connection = match a.connection {
                Some(c) if c.contains('/') => Some(c),
                Some(c) => Some(format!("{}/{c}", ops::namespace_or_default(ns).await?)),
                None => None,
            };
            let args = crate::cli::ExportUsersArgs {
                connection,
                database_url: a.database_url,
                domain: a.domain,
                template: a.template,
            };
            crate::cli::export_users(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Create(PluginCreate::PhoneRestart(a)) => {
            let args = crate::cli::PhoneRestartArgs {
                from: a.from,
                from_configmap: a.from_configmap,
                namespace: ns,
                schedule: a.schedule,
                window: a.window,
            };
            crate::cli::create_phone_restart(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_short_singular_plural_and_group_name() {
        for (text, kind) in [
            ("buc", Kind::UserChange),
            ("BulkUserChange", Kind::UserChange),
            ("bulkuserchanges", Kind::UserChange),
            ("bulkuserchanges.pbx-operator.io", Kind::UserChange),
            ("bpc", Kind::PhoneChange),
            ("phonerestart", Kind::Restart),
            ("prs", Kind::Restart),
            ("urc", Kind::Recycle),
            ("userrecycles", Kind::Recycle),
        ] {
            assert_eq!(Kind::parse(text), Some(kind), "{text}");
        }
        assert_eq!(Kind::parse("pod"), None);
        assert_eq!(
            parse_target("buc/x").unwrap(),
            (Kind::UserChange, "x".into())
        );
        assert!(parse_target("buc").is_err());
        assert!(parse_target("buc/").is_err());
        assert!(parse_target("deploy/x").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        Plugin::command().debug_assert();
    }

    #[test]
    fn standard_flags_go_anywhere() {
        let p = Plugin::try_parse_from([
            "kubectl-pbx",
            "plan",
            "buc/x",
            "-n",
            "acme",
            "--context",
            "prod",
            "-o",
            "csv",
        ])
        .unwrap();
        assert_eq!(p.namespace.as_deref(), Some("acme"));
        assert_eq!(p.context.as_deref(), Some("prod"));
        assert!(matches!(
            p.command,
            PluginCommand::Plan {
                output: Output::Csv,
                ..
            }
        ));
    }
}
