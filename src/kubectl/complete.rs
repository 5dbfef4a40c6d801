//! Completion of `kubectl pbx <TAB>`: kubectl (1.26+) runs the executable `kubectl_complete-pbx`
//! (a symlink to this binary) with the words typed after `kubectl pbx`, the last one being the
//! word to complete, and reads Cobra's completion format: one candidate a line (tab, then a
//! description), then `:<directive>`. `kubectl-pbx completion bash|zsh` covers `kubectl-pbx`
//! typed as one word.

use clap::CommandFactory;

use super::{Kind, Plugin};

/// The name kubectl runs for plugin completion.
pub const COMPLETE_NAME: &str = "kubectl_complete-pbx";

/// Cobra's ShellCompDirective bits.
pub const NO_SPACE: u32 = 2;
pub const NO_FILE: u32 = 4;

/// What to offer, and what must be listed from the cluster first.
#[derive(Debug, PartialEq)]
pub struct Completion {
    pub words: Vec<(String, String)>,
    pub directive: u32,
    pub lookup: Option<Lookup>,
}

#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// Names of this kind in the namespace (None: the kubeconfig's), as `short/name`.
    Names {
        kind: Kind,
        namespace: Option<String>,
    },
    Namespaces,
}

const TAKES_TARGET: [&str; 6] = ["plan", "approve", "wait", "results", "revert", "--"];
const VALUE_FLAGS: [&str; 8] = [
    "-n",
    "--namespace",
    "--context",
    "--kubeconfig",
    "-o",
    "--output",
    "--hash",
    "--timeout",
];

fn flags_of(cmd: &clap::Command) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for a in cmd.get_arguments() {
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        if let Some(l) = a.get_long() {
            out.push((format!("--{l}"), help.clone()));
        }
        if let Some(s) = a.get_short() {
            out.push((format!("-{s}"), help));
        }
    }
    out
}

/// Candidates for `args` (the last one is being typed), without the cluster.
pub fn candidates(args: &[String]) -> Completion {
    let (partial, before) = match args.split_last() {
        Some((p, b)) => (p.as_str(), b),
        None => ("", &[][..]),
    };
    let root = Plugin::command();
    let mut namespace = None;
    let mut path: Vec<String> = Vec::new();
    let mut positionals = 0;
    let mut i = 0;
    while i < before.len() {
        let w = before[i].as_str();
        if VALUE_FLAGS.contains(&w) {
            if matches!(w, "-n" | "--namespace") {
                namespace = before.get(i + 1).cloned();
            }
            i += 2;
            continue;
        }
        if !w.starts_with('-') {
            if path.len() < 2 && is_subcommand(&root, &path, w) {
                path.push(w.to_string());
            } else {
                positionals += 1;
            }
        }
        i += 1;
    }
    let filter = |words: Vec<(String, String)>, directive: u32| Completion {
        words: words
            .into_iter()
            .filter(|(w, _)| w.starts_with(partial))
            .collect(),
        directive,
        lookup: None,
    };
    match before.last().map(String::as_str) {
        Some("-n" | "--namespace") => {
            return Completion {
                words: vec![],
                directive: NO_FILE,
                lookup: Some(Lookup::Namespaces),
            };
        }
        Some("-o" | "--output") => {
            let outputs = ["table", "json", "yaml", "csv"];
            return filter(
                outputs
                    .iter()
                    .map(|o| (o.to_string(), String::new()))
                    .collect(),
                NO_FILE,
            );
        }
        Some("--kubeconfig") => {
            return Completion {
                words: vec![],
                directive: 0,
                lookup: None,
            };
        }
        Some("--context" | "--hash" | "--timeout") => return filter(vec![], NO_FILE),
        _ => {}
    }
    let mut cmd = &root;
    for p in &path {
        match cmd.find_subcommand(p) {
            Some(c) => cmd = c,
            None => break,
        }
    }
    if partial.starts_with('-') {
        let mut flags = flags_of(cmd);
        flags.extend(flags_of(&root));
        flags.sort();
        flags.dedup_by(|a, b| a.0 == b.0);
        return filter(flags, NO_FILE);
    }
    let subcommands: Vec<(String, String)> = cmd
        .get_subcommands()
        .filter(|c| c.get_name() != "help")
        .map(|c| {
            let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
            (c.get_name().to_string(), about)
        })
        .collect();
    if !subcommands.is_empty() {
        return filter(subcommands, NO_FILE);
    }
    let name = path.first().map(String::as_str).unwrap_or("");
    if name == "completion" && positionals == 0 {
        return filter(
            vec![
                ("bash".into(), String::new()),
                ("zsh".into(), String::new()),
            ],
            NO_FILE,
        );
    }
    if TAKES_TARGET.contains(&name) && positionals == 0 {
        if let Some((kind, _)) = partial.split_once('/')
            && let Some(kind) = Kind::parse(kind)
        {
            return Completion {
                words: vec![],
                directive: NO_FILE,
                lookup: Some(Lookup::Names { kind, namespace }),
            };
        }
        let kinds = Kind::ALL
            .iter()
            .filter(|k| name != "approve" || k.approvable())
            .filter(|k| name != "revert" || k.revertible())
            .map(|k| (format!("{}/", k.short()), k.singular().to_string()))
            .collect();
        return filter(kinds, NO_FILE | NO_SPACE);
    }
    filter(vec![], NO_FILE)
}

fn is_subcommand(root: &clap::Command, path: &[String], word: &str) -> bool {
    let mut cmd = root;
    for p in path {
        match cmd.find_subcommand(p) {
            Some(c) => cmd = c,
            None => return false,
        }
    }
    cmd.find_subcommand(word).is_some()
}

/// Cobra's format: candidates (with a tab and the description), then `:<directive>`.
pub fn render(c: &Completion) -> String {
    let mut out = String::new();
    for (w, d) in &c.words {
        if d.is_empty() {
            out.push_str(&format!("{w}\n"));
        } else {
            out.push_str(&format!("{w}\t{d}\n"));
        }
    }
    out.push_str(&format!(":{}\n", c.directive));
    out
}

/// Prints the completion of `args`, listing names from the cluster where needed (silently
/// without them when the cluster cannot be reached: completion must never fail loudly).
pub async fn complete(args: &[String]) {
    let mut c = candidates(args);
    let partial = args.last().map(String::as_str).unwrap_or("");
    if let Some(lookup) = c.lookup.take()
        && let Ok(client) = super::client().await
    {
        use kube::api::{Api, DynamicObject, ListParams};
        let names: Vec<String> = match lookup {
            Lookup::Names { kind, namespace } => {
                let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
                let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &kind.resource());
                let prefix = partial.split_once('/').map(|(k, _)| k).unwrap_or("");
                api.list_metadata(&ListParams::default())
                    .await
                    .map(|l| {
                        l.items
                            .into_iter()
                            .filter_map(|o| o.metadata.name)
                            .map(|n| format!("{prefix}/{n}"))
                            .collect()
                    })
                    .unwrap_or_default()
            }
            Lookup::Namespaces => {
                let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
                api.list_metadata(&ListParams::default())
                    .await
                    .map(|l| {
                        l.items
                            .into_iter()
                            .filter_map(|o| o.metadata.name)
                            .collect()
                    })
                    .unwrap_or_default()
            }
        };
        c.words = names
            .into_iter()
            .filter(|n| n.starts_with(partial))
            .map(|n| (n, String::new()))
            .collect();
    }
    print!("{}", render(&c));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str]) -> (Vec<String>, u32) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let c = candidates(&args);
        (c.words.into_iter().map(|(w, _)| w).collect(), c.directive)
    }

    #[test]
    fn subcommands_then_kinds_then_flags() {
        let (w, d) = words(&[""]);
        assert_eq!(
            w,
            [
                "plan",
                "approve",
                "wait",
                "status",
                "results",
                "revert",
                "export",
                "create",
                "completion"
            ]
        );
        assert_eq!(d, NO_FILE);
        assert_eq!(words(&["ap"]).0, ["approve"]);
        assert_eq!(words(&["-n", "acme", "pl"]).0, ["plan"]);
        assert_eq!(
            words(&["plan", ""]),
            (
                vec!["buc/".into(), "bpc/".into(), "prs/".into(), "urc/".into()],
                NO_FILE | NO_SPACE
            )
        );
        assert_eq!(words(&["approve", ""]).0, ["buc/", "bpc/"]);
        assert_eq!(words(&["revert", ""]).0, ["buc/", "bpc/", "urc/"]);
        assert_eq!(words(&["plan", "buc/x", ""]).0, Vec::<String>::new());
        assert_eq!(
            words(&["plan", "buc/x", "-o", ""]).0,
            ["table", "json", "yaml", "csv"]
        );
        assert!(
            words(&["approve", "buc/x", "--"])
                .0
                .contains(&"--yes".to_string())
        );
        assert!(
            words(&["wait", "--"])
                .0
                .contains(&"--namespace".to_string())
        );
        assert_eq!(words(&["create", ""]).0, ["phone-restart"]);
        assert_eq!(words(&["export", "u"]).0, ["users"]);
        assert_eq!(words(&["completion", ""]).0, ["bash", "zsh"]);
    }

    #[test]
    fn names_and_namespaces_come_from_the_cluster() {
        let args: Vec<String> = ["-n", "acme", "wait", "prs/ni"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            candidates(&args).lookup,
            Some(Lookup::Names {
                kind: Kind::Restart,
                namespace: Some("acme".into())
            })
        );
        let args: Vec<String> = ["status", "-n", ""].iter().map(|s| s.to_string()).collect();
        assert_eq!(candidates(&args).lookup, Some(Lookup::Namespaces));
    }

    #[test]
    fn cobra_format() {
        let c = Completion {
            words: vec![
                ("plan".into(), "Show".into()),
                ("buc/".into(), String::new()),
            ],
            directive: 6,
            lookup: None,
        };
        assert_eq!(render(&c), "plan\tShow\nbuc/\n:6\n");
    }
}
