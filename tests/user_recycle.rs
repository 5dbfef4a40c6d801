//! UserRecycle end to end: the real control plane, the operator process, a real Kamailio (SQLite
//! and PostgreSQL) with SIPp phones, and a real SMTP server.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use pbx_operator::api::{Outcome, Phase, UserRecycle};
use pbx_operator::plan::stored::{Row, from_jsonl};
use sqlx::{AssertSqlSafe, Row as _};
use support::eventually;
use support::lab::LabSpec;
use support::pbx::Env;

/// Every column of the tables a reset may touch, as text, so rows compare byte for byte.
const TABLES: [(&str, &[&str]); 5] = [
    (
        "subscriber",
        &["id", "username", "domain", "password", "ha1", "ha1b"],
    ),
    (
        "usr_preferences",
        &[
            "id",
            "uuid",
            "username",
            "domain",
            "attribute",
            "type",
            "value",
            "last_modified",
        ],
    ),
    ("grp", &["id", "username", "domain", "grp", "last_modified"]),
    (
        "dbaliases",
        &["id", "alias_username", "alias_domain", "username", "domain"],
    ),
    (
        "pbx_phone",
        &[
            "id",
            "mac",
            "vendor",
            "model",
            "owner_username",
            "domain",
            "label",
        ],
    ),
];

type Snapshot = BTreeMap<&'static str, Vec<Vec<String>>>;

async fn snapshot(env: &Env) -> Snapshot {
    let mut out = BTreeMap::new();
    for (table, columns) in TABLES {
        let cols: Vec<String> = columns
            .iter()
            .map(|c| format!("COALESCE(CAST({c} AS TEXT), '<null>')"))
            .collect();
        let q = format!("SELECT {} FROM {table} ORDER BY id", cols.join(", "));
        let rows = sqlx::query(AssertSqlSafe(q))
            .fetch_all(&env.pool)
            .await
            .unwrap();
        out.insert(
            table,
            rows.iter()
                .map(|r| (0..columns.len()).map(|i| r.get::<String, _>(i)).collect())
                .collect(),
        );
    }
    out
}

async fn wait_done(env: &Env, name: &str, timeout: Duration) -> UserRecycle {
    let api: Api<UserRecycle> = Api::namespaced(env.client.clone(), &env.ns);
    eventually(timeout, &format!("{name} to finish"), || async {
        let u = api.get(name).await.ok()?;
        let s = u.status.as_ref()?;
        (s.observed_generation == u.metadata.generation
            && matches!(
                s.phase,
                Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
            ))
        .then_some(u)
    })
    .await
}

fn condition(u: &UserRecycle, type_: &str) -> (String, String) {
    let c = u
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone())
}

/// The rows of the first results ConfigMap (all targets: a UserRecycle has at most 200).
async fn rows(env: &Env, name: &str) -> Vec<Row> {
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let Ok(Some(cm)) = cms.get_opt(&format!("{name}-results-1")).await else {
        return vec![];
    };
    from_jsonl(&support::results_rows(&cm)).unwrap_or_default()
}

async fn registered(env: &Env, ext: &str) -> usize {
    env.sql_one(&format!(
        "SELECT COUNT(*) FROM location WHERE username = '{ext}'"
    ))
    .await
    .parse()
    .unwrap()
}

fn results_csv(env: &Env, name: &str) -> String {
    let (ok, csv, err) = env.cli(&["results", &format!("userrecycle/{name}"), "-n", &env.ns]);
    assert!(ok, "{err}");
    assert!(
        csv.starts_with("target,outcome,changes,actions,notes\n"),
        "{csv}"
    );
    csv
}

const DEFAULT_ATTRIBUTES: [&str; 4] = [
    "pbx.first_name",
    "pbx.last_name",
    "pbx.email",
    "pbx.voicemail_pin",
];
const ALL_ATTRIBUTES: [&str; 10] = [
    "pbx.first_name",
    "pbx.last_name",
    "pbx.email",
    "pbx.voicemail_pin",
    "pbx.role",
    "pbx.call_group",
    "pbx.pickup_group",
    "pbx.primary_number_location",
    "pbx.private_number",
    "pbx.private_number_location",
];

#[tokio::test]
async fn reset_clears_what_is_named_and_nothing_else() {
    let env = Env::start(
        "urc-reset",
        LabSpec {
            users: 20,
            phones: 13,
            ..Default::default()
        },
        false,
    )
    .await;
    // Things the seed does not have: a voicemail PIN to clear, and a two-factor secret that no
    // reset item names (it must stay).
    for ext in ["210", "211", "203"] {
        env.set_attribute(
            ext,
            "pbx.voicemail_pin",
            "pbkdf2-sha256$100000$c2FsdHNhbHQ$aGFzaGhhc2g",
        )
        .await;
        env.set_attribute(ext, "pbx.totp_secret", "JBSWY3DPEHPK3PXP")
            .await;
    }
    // The leavers' desk phones are registered and their password works.
    for ext in ["210", "211"] {
        eventually(
            Duration::from_secs(30),
            &format!("{ext}'s phone to be registered"),
            || async { (registered(&env, ext).await > 0).then_some(()) },
        )
        .await;
        assert_eq!(env.lab.register_once(ext), 200, "{ext} before the reset");
    }
    let before = snapshot(&env).await;

    let leavers =
        std::fs::read_to_string(support::repo_root().join("examples/userrecycle-leavers.yaml"))
            .unwrap();
    env.apply(&leavers);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: UserRecycle
metadata: { name: everything-203 }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["203"] }
  reset: [Name, Email, Password, VoicemailPin, Devices, Role, Groups, Numbers, CallGroup, PickupGroup]
  requestedBy: alice@acme.test
"#,
    );
    let u = wait_done(&env, "leavers-2026-11", Duration::from_secs(90)).await;
    let everything = wait_done(&env, "everything-203", Duration::from_secs(90)).await;
    let status = u.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);
    let s = status.summary.clone().unwrap();
    assert_eq!((s.targets, s.changed, s.failed), (2, 2, 0));
    assert_eq!(condition(&u, "Ready"), ("True".into(), "Succeeded".into()));
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != "Reconciling" && c.type_ != "Stalled")
    );
    assert_eq!(
        everything.status.as_ref().unwrap().phase,
        Phase::Succeeded,
        "{:?}",
        everything.status
    );

    // Per target: what was cleared, from what; secrets never shown.
    let r210 = status.results.iter().find(|r| r.target == "210").unwrap();
    assert_eq!(r210.outcome, Outcome::Changed);
    let fields: BTreeSet<&str> = r210.changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "firstName",
            "lastName",
            "email",
            "password",
            "voicemailPin",
            "devices",
            "status"
        ]),
        "{:?}",
        r210.changes
    );
    let first = r210
        .changes
        .iter()
        .find(|c| c.field == "firstName")
        .unwrap();
    assert_eq!(first.from, before_value(&before, "210", "pbx.first_name"));
    assert_eq!(first.to, None);
    let pin = r210
        .changes
        .iter()
        .find(|c| c.field == "voicemailPin")
        .unwrap();
    assert_eq!(pin.from.as_deref(), Some("(set)"));
    assert!(
        r210.notes.iter().any(|n| n.starts_with("reset: done")),
        "{:?}",
        r210.notes
    );

    let after = snapshot(&env).await;
    let reset: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("210", &DEFAULT_ATTRIBUTES[..]),
        ("211", &DEFAULT_ATTRIBUTES[..]),
        ("203", &ALL_ATTRIBUTES[..]),
    ]);

    // usr_preferences: the named attributes are gone, the status says SetupRequired, and every
    // other row (of these users and of everyone else) is byte for byte what it was.
    let prefs = |rows: &Vec<Vec<String>>, drop_named: bool| -> Vec<Vec<String>> {
        rows.iter()
            .filter(|r| {
                let (user, attribute) = (r[2].as_str(), r[4].as_str());
                match reset.get(user) {
                    Some(named) => {
                        attribute != "pbx.status" && !(drop_named && named.contains(&attribute))
                    }
                    None => true,
                }
            })
            .cloned()
            .collect()
    };
    assert_eq!(
        prefs(&after["usr_preferences"], false),
        prefs(&before["usr_preferences"], true),
        "usr_preferences rows other than the named ones changed"
    );
    for (ext, named) in &reset {
        for attribute in *named {
            assert_eq!(
                env.attribute(ext, attribute).await,
                None,
                "{ext} {attribute} left behind"
            );
        }
        assert_eq!(
            env.attribute(ext, "pbx.status").await.as_deref(),
            Some("SetupRequired")
        );
        assert_eq!(
            env.attribute(ext, "pbx.totp_secret").await.as_deref(),
            Some("JBSWY3DPEHPK3PXP"),
            "not named: kept"
        );
    }

    // subscriber: only the reset users' HA1s changed, to something nobody was told.
    let subs = |rows: &Vec<Vec<String>>| -> Vec<Vec<String>> {
        rows.iter()
            .map(|r| {
                let mut r = r.clone();
                if reset.contains_key(r[1].as_str()) {
                    r.truncate(4);
                }
                r
            })
            .collect()
    };
    assert_eq!(subs(&after["subscriber"]), subs(&before["subscriber"]));
    for ext in reset.keys() {
        let find = |s: &Snapshot| {
            s["subscriber"]
                .iter()
                .find(|r| r[1] == *ext)
                .unwrap()
                .clone()
        };
        let (old, new) = (find(&before), find(&after));
        assert_ne!(old[4], new[4], "{ext}: ha1 rotated");
        assert_ne!(old[5], new[5], "{ext}: ha1b rotated");
        assert_eq!(new[3], "", "{ext}: no plaintext password");
    }

    // grp and dbaliases: only 203's rows (Groups and Numbers named) are gone.
    for table in ["grp", "dbaliases"] {
        let user_col = if table == "grp" { 1 } else { 3 };
        let expected: Vec<Vec<String>> = before[table]
            .iter()
            .filter(|r| r[user_col] != "203")
            .cloned()
            .collect();
        assert_eq!(after[table], expected, "{table}");
        assert!(
            before[table].len() > expected.len(),
            "{table}: 203 had rows"
        );
    }

    // pbx_phone: the reset users' phones stay in the inventory, unassigned; nothing else moves.
    let expected_phones: Vec<Vec<String>> = before["pbx_phone"]
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if reset.contains_key(r[4].as_str()) {
                r[4] = "<null>".into();
            }
            r
        })
        .collect();
    assert_eq!(after["pbx_phone"], expected_phones);
    assert_eq!(after["pbx_phone"].len(), before["pbx_phone"].len());

    // Old phones stop working at once: bindings dropped, the old password refused.
    for ext in ["210", "211"] {
        assert_eq!(registered(&env, ext).await, 0, "{ext} still registered");
        assert_eq!(
            env.lab.register_once(ext),
            401,
            "{ext}: old password refused"
        );
    }
    assert_eq!(env.lab.register_once("205"), 200, "others keep working");

    // Results CSV, Events, printer columns.
    let csv = results_csv(&env, "leavers-2026-11");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        csv.contains("\n210,Changed,") && csv.contains("\n211,Changed,"),
        "{csv}"
    );
    assert!(csv.contains("password: (set) -> (new secret)"), "{csv}");
    assert!(!csv.contains("0123abcd"), "a PIN hash leaked: {csv}");
    let events = env.events();
    assert!(
        events.contains("Started") && events.contains("Finished"),
        "{events}"
    );
    assert!(events.contains("alice@acme.test"), "{events}");
    let table = support::kubectl(
        &support::control_plane().admin_kubeconfig,
        &["get", "urc", "leavers-2026-11", "-n", &env.ns],
    );
    let line: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &line[..5],
        ["leavers-2026-11", "Succeeded", "2", "2", "0"],
        "{table}"
    );
}

fn before_value(s: &Snapshot, ext: &str, attribute: &str) -> Option<String> {
    s["usr_preferences"]
        .iter()
        .find(|r| r[2] == ext && r[4] == attribute)
        .map(|r| r[6].clone())
}

#[tokio::test]
async fn recycle_gives_the_extension_to_a_new_hire_with_a_welcome_email() {
    let mut env = Env::start(
        "urc-recycle",
        LabSpec {
            db: "postgres",
            users: 20,
            phones: 13,
            ..Default::default()
        },
        true,
    )
    .await;
    env.set_attribute(
        "209",
        "pbx.voicemail_pin",
        "pbkdf2-sha256$100000$c2FsdHNhbHQ$aGFzaGhhc2g",
    )
    .await;
    let old_ha1 = ha1(&env, "209").await;
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM pbx_phone WHERE owner_username = '209'")
            .await,
        "1",
        "209 has a desk phone to unassign"
    );
    // More secrets for the check below: TOTP secrets, the HA1B, 213's HA1, and the stored PIN's
    // hash (the part after its scheme), as the PBX holds them before the recycle.
    const TOTP: &str = "JBSWY3DPEHPK3PXPQ7Z2M4TAKZ3XW5NB";
    env.set_attribute("209", "pbx.totp_secret", TOTP).await;
    env.set_attribute("213", "pbx.totp_secret", &TOTP.to_lowercase())
        .await;
    let old_ha1b = ha1b(&env, "209").await;
    let old_ha1_213 = ha1(&env, "213").await;
    let pin_stored = env
        .attribute("209", "pbx.voicemail_pin")
        .await
        .expect("209 has a voicemail PIN");
    let pin_hash = pin_stored.rsplit([':', '$']).next().unwrap().to_string();
    let new_hire =
        std::fs::read_to_string(support::repo_root().join("examples/userrecycle-new-hire.yaml"))
            .unwrap();
    env.apply(&new_hire);
    env.apply(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: UserRecycle
metadata: { name: no-email-213 }
spec:
  connectionRef: { name: acme }
  targets: { extensions: ["213"] }
  recycle:
    - { extension: "213", firstName: Ben, lastName: Novak }
  sendWelcomeEmail: true
"#,
    );
    let u = wait_done(&env, "new-hire-ana-diaz", Duration::from_secs(90)).await;
    let status = u.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);
    assert!(status.warnings.is_empty(), "{:?}", status.warnings);
    let r = &status.results[0];
    assert_eq!((r.target.as_str(), r.outcome), ("209", Outcome::Changed));
    assert!(
        r.notes.iter().any(|n| n.starts_with("recycle: done"))
            && r.notes.iter().any(|n| n == "welcome email: sent"),
        "{:?}",
        r.notes
    );

    // The new identity, no usable password or PIN, PasswordRequired; groups cleared (named).
    for (attribute, value) in [
        ("pbx.first_name", Some("Ana")),
        ("pbx.last_name", Some("Diaz")),
        ("pbx.email", Some("ana.diaz@acme.test")),
        ("pbx.status", Some("PasswordRequired")),
        ("pbx.voicemail_pin", None),
    ] {
        assert_eq!(
            env.attribute("209", attribute).await.as_deref(),
            value,
            "{attribute}"
        );
    }
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM grp WHERE username = '209'")
            .await,
        "0"
    );
    assert_ne!(ha1(&env, "209").await, old_ha1);
    assert_eq!(
        env.lab.register_once("209"),
        401,
        "the old password is gone"
    );
    assert_eq!(
        env.sql_one("SELECT COUNT(*) FROM pbx_phone WHERE owner_username = '209'")
            .await,
        "0"
    );

    // The welcome email: to the new person, naming the extension, with no secret in it.
    let smtp = env.smtp.as_ref().unwrap();
    let mails = eventually(Duration::from_secs(20), "the welcome email", || async {
        let m = smtp.messages();
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];
    assert!(mail.contains("To: ana.diaz@acme.test"), "{mail}");
    assert!(mail.contains("extension 209") || mail.contains("extension is 209"));
    assert!(mail.contains("Ana"), "{mail}");
    let new_ha1 = ha1(&env, "209").await;
    for secret in [
        env.lab.get("LAB_PHONE_PASSWORD"),
        &new_ha1,
        &old_ha1,
        &pin_hash,
        TOTP,
    ] {
        assert!(!mail.contains(secret), "the mail holds a secret: {mail}");
    }
    let csv = results_csv(&env, "new-hire-ana-diaz");
    assert!(csv.contains("\n209,Changed,"), "{csv}");
    assert!(csv.contains("-> Ana"), "{csv}");
    assert!(csv.contains("status: ") && csv.contains("-> PasswordRequired"));
    assert!(!csv.contains(&new_ha1) && !csv.contains(&old_ha1));

    // A missing email is a warning, not a failure: the extension is recycled, no mail is sent.
    let u = wait_done(&env, "no-email-213", Duration::from_secs(90)).await;
    let status = u.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Succeeded, "{:?}", status.results);
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("213") && w.contains("without email")),
        "{:?}",
        status.warnings
    );
    assert!(
        status.results[0]
            .notes
            .iter()
            .any(|n| n.starts_with("welcome email: not sent")),
        "{:?}",
        status.results[0].notes
    );
    for (attribute, value) in [
        ("pbx.first_name", Some("Ben")),
        ("pbx.last_name", Some("Novak")),
        ("pbx.email", None),
        ("pbx.status", Some("PasswordRequired")),
    ] {
        assert_eq!(
            env.attribute("213", attribute).await.as_deref(),
            value,
            "{attribute}"
        );
    }

    // No secret anywhere the operator writes: every mail sent, its log, the UserRecycles (with
    // status), the Events and every ConfigMap (the results) of the namespace. The secrets are
    // read from where they live: SQL after the recycle (the rotated HA1 / HA1B nobody is told),
    // the values seeded before it, and the database password from the connection's Secret.
    let secrets: Vec<(&str, String)> = vec![
        (
            "the lab's SIP password",
            env.lab.get("LAB_PHONE_PASSWORD").to_string(),
        ),
        ("209's HA1 before", old_ha1.clone()),
        ("209's HA1B before", old_ha1b.clone()),
        ("209's HA1 after", new_ha1.clone()),
        ("209's HA1B after", ha1b(&env, "209").await),
        ("213's HA1 before", old_ha1_213.clone()),
        ("213's HA1 after", ha1(&env, "213").await),
        ("213's HA1B after", ha1b(&env, "213").await),
        ("209's voicemail PIN hash", pin_hash.clone()),
        ("209's TOTP secret", TOTP.to_string()),
        ("213's TOTP secret", TOTP.to_lowercase()),
        ("the database password", database_password(&env).await),
    ];
    assert_ne!(secrets[3].1, secrets[1].1, "209's HA1 was rotated");
    assert_ne!(secrets[6].1, secrets[5].1, "213's HA1 was rotated");
    let mut places: Vec<(String, String)> = smtp
        .messages()
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("mail {i}"), support::smtp::decoded(m)))
        .collect();
    assert_eq!(places.len(), 1, "one mail sent (to Ana)");
    places.push(("the operator's log".into(), env.operator.log_text()));
    places.extend(namespace_objects(&env).await);
    for (what, secret) in &secrets {
        assert!(
            secret.len() >= 8,
            "{what} is too short to search for: {secret:?}"
        );
        for (place, text) in &places {
            assert!(
                !text.contains(secret.as_str()),
                "{what} ({secret}) appears in {place}:\n{text}"
            );
        }
    }

    // A finished recycle stays finished across a restart: nothing is reset or sent again.
    let api: Api<UserRecycle> = Api::namespaced(env.client.clone(), &env.ns);
    let finished_at = api
        .get("new-hire-ana-diaz")
        .await
        .unwrap()
        .status
        .unwrap()
        .completion_time;
    env.kill_and_restart_operator();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(smtp_count(&env), 1, "no second welcome email");
    assert_eq!(
        env.attribute("209", "pbx.first_name").await.as_deref(),
        Some("Ana")
    );
    assert_eq!(ha1(&env, "209").await, new_ha1, "not rotated again");
    let again = api.get("new-hire-ana-diaz").await.unwrap().status.unwrap();
    assert_eq!(again.completion_time, finished_at, "not run again");
}

/// Every user's HA1: a changed one shows a reset or recycle committed on the PBX.
async fn ha1s(env: &Env) -> BTreeMap<String, String> {
    sqlx::query("SELECT username, ha1 FROM subscriber")
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect()
}

async fn ha1(env: &Env, ext: &str) -> String {
    env.sql_one(&format!(
        "SELECT ha1 FROM subscriber WHERE username = '{ext}'"
    ))
    .await
}

async fn ha1b(env: &Env, ext: &str) -> String {
    env.sql_one(&format!(
        "SELECT ha1b FROM subscriber WHERE username = '{ext}'"
    ))
    .await
}

/// The password in the connection's database URL, read from its Secret.
async fn database_password(env: &Env) -> String {
    use k8s_openapi::api::core::v1::Secret;
    let secret = Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .get("acme-pbx")
        .await
        .unwrap();
    let url = String::from_utf8(secret.data.unwrap()["database-url"].0.clone()).unwrap();
    let userinfo = url.split_once("://").unwrap().1.split_once('@').unwrap().0;
    userinfo.split_once(':').unwrap().1.to_string()
}

/// Everything of the namespace a person or a pipeline reads, as text: the UserRecycles with
/// their status, the PbxConnection, the Events and every ConfigMap (binaryData unzipped).
async fn namespace_objects(env: &Env) -> Vec<(String, String)> {
    use k8s_openapi::api::core::v1::Event;
    use pbx_operator::api::PbxConnection;
    let mut out = Vec::new();
    for u in Api::<UserRecycle>::namespaced(env.client.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.push((
            format!(
                "UserRecycle {}",
                u.metadata.name.clone().unwrap_or_default()
            ),
            serde_json::to_string(&u).unwrap(),
        ));
    }
    for c in Api::<PbxConnection>::namespaced(env.client.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.push((
            "the PbxConnection".into(),
            serde_json::to_string(&c).unwrap(),
        ));
    }
    let events = Api::<Event>::namespaced(env.client.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(!events.items.is_empty(), "the operator records Events");
    out.push((
        "the Events".into(),
        serde_json::to_string(&events.items).unwrap(),
    ));
    let cms = Api::<ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(
        cms.items.iter().any(|c| c
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("new-hire-ana-diaz-results-"))),
        "the results are in ConfigMaps"
    );
    for cm in cms {
        let name = format!("ConfigMap {}", cm.metadata.name.clone().unwrap_or_default());
        let mut text = serde_json::to_string(&cm).unwrap();
        for bytes in cm.binary_data.iter().flat_map(|d| d.values()) {
            let mut unzipped = String::new();
            use std::io::Read;
            if flate2::read::GzDecoder::new(&bytes.0[..])
                .read_to_string(&mut unzipped)
                .is_ok()
            {
                text.push_str(&unzipped);
            } else {
                text.push_str(&String::from_utf8_lossy(&bytes.0));
            }
        }
        out.push((name, text));
    }
    out
}

fn smtp_count(env: &Env) -> usize {
    env.smtp.as_ref().unwrap().messages().len()
}

#[tokio::test]
async fn sigkill_mid_recycle_resumes_without_losing_the_new_identities() {
    const FIRST: u32 = 200;
    const USERS: u32 = 150;
    const RECYCLED_FROM: u32 = 250; // 250..349 go to new people, 200..249 are only reset
    let mut env = Env::start(
        "urc-crash",
        LabSpec {
            db: "postgres",
            users: USERS as usize,
            phones: 0,
            ..Default::default()
        },
        true,
    )
    .await;
    let seed_ha1 = ha1s(&env).await;
    let targets: Vec<String> = (FIRST..FIRST + USERS).map(|e| format!("\"{e}\"")).collect();
    let recycle: Vec<String> = (RECYCLED_FROM..FIRST + USERS)
        .map(|e| {
            format!(
                "    - {{ extension: \"{e}\", firstName: New{e}, lastName: Hire{e}, email: new{e}@acme.test }}"
            )
        })
        .collect();
    env.apply(&format!(
        r#"apiVersion: pbx-operator.io/v1alpha1
kind: UserRecycle
metadata: {{ name: reorg }}
spec:
  connectionRef: {{ name: acme }}
  targets:
    extensions: [{}]
  recycle:
{}
  sendWelcomeEmail: true
"#,
        targets.join(", "),
        recycle.join("\n")
    ));
    let api: Api<UserRecycle> = Api::namespaced(env.client.clone(), &env.ns);
    let mut kills = Vec::new();
    // Kill when the run has started (likely mid-reset), once resets are recorded (recycles
    // under way), and once welcome emails are going out.
    for stage in ["running", "reset recorded", "mail sent"] {
        let reached = eventually(
            Duration::from_secs(120),
            &format!("stage {stage}"),
            || async {
                let u = api.get("reorg").await.ok()?;
                let phase = u.status.as_ref().map(|s| s.phase);
                if matches!(
                    phase,
                    Some(Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed)
                ) {
                    return Some(false);
                }
                let rows = rows(&env, "reorg").await;
                let notes = || rows.iter().flat_map(|r| r.notes.iter());
                let hit = match stage {
                    "running" => phase == Some(Phase::Running),
                    "reset recorded" => notes().any(|n| n.starts_with("reset: done")),
                    _ => notes().any(|n| n == "welcome email: sent"),
                };
                hit.then_some(true)
            },
        )
        .await;
        if !reached {
            break;
        }
        if stage == "running" {
            tokio::time::sleep(Duration::from_millis(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_millis() as u64
                    % 400,
            ))
            .await;
        }
        let done = rows(&env, "reorg")
            .await
            .iter()
            .filter(|r| r.notes.iter().any(|n| n.starts_with("reset: done")))
            .count();
        let on_pbx = ha1s(&env)
            .await
            .iter()
            .filter(|(u, h)| seed_ha1.get(*u) != Some(*h))
            .count();
        kills.push(format!(
            "{stage} ({done} resets recorded, {on_pbx} HA1s rotated on the PBX)"
        ));
        env.kill_and_restart_operator();
    }
    eprintln!("SIGKILLed the operator at: {kills:?}");
    assert_eq!(
        kills.len(),
        3,
        "every kill landed while the run was going: {kills:?}"
    );

    let u = wait_done(&env, "reorg", Duration::from_secs(240)).await;
    let status = u.status.clone().unwrap();
    let s = status.summary.unwrap();
    // A welcome mail under way at a kill is reported Uncertain, never Changed.
    let expected = if s.uncertain == 0 {
        Phase::Succeeded
    } else {
        Phase::PartiallyFailed
    };
    assert_eq!(status.phase, expected, "{:?}", status.results.first());
    assert_eq!(
        (s.targets, s.changed + s.uncertain, s.failed),
        (USERS, USERS, 0)
    );

    // Every target exactly once in the results, every one changed.
    let csv = results_csv(&env, "reorg");
    let reported: Vec<&str> = csv
        .lines()
        .skip(1)
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|l| l.split(',').next().unwrap())
        .collect();
    let unique: BTreeSet<&str> = reported.iter().copied().collect();
    assert_eq!(reported.len(), USERS as usize, "{csv}");
    assert_eq!(unique.len(), USERS as usize);
    let final_rows = rows(&env, "reorg").await;
    assert!(
        final_rows.iter().all(|r| r.outcome == Outcome::Changed
            || (r.outcome == Outcome::Uncertain
                && r.notes
                    .iter()
                    .any(|n| n.starts_with("welcome email: not re-sent")))),
        "{:?}",
        final_rows.iter().find(|r| r.outcome != Outcome::Changed)
    );

    // The new people are in place; nobody was reset after being recycled.
    for e in FIRST..FIRST + USERS {
        let ext = e.to_string();
        let get = |a: &'static str| {
            let ext = ext.clone();
            let env = &env;
            async move { env.attribute(&ext, a).await }
        };
        if e >= RECYCLED_FROM {
            assert_eq!(get("pbx.first_name").await, Some(format!("New{e}")));
            assert_eq!(get("pbx.last_name").await, Some(format!("Hire{e}")));
            assert_eq!(get("pbx.email").await, Some(format!("new{e}@acme.test")));
            assert_eq!(get("pbx.status").await.as_deref(), Some("PasswordRequired"));
        } else {
            assert_eq!(get("pbx.first_name").await, None, "{ext}");
            assert_eq!(get("pbx.email").await, None, "{ext}");
            assert_eq!(get("pbx.status").await.as_deref(), Some("SetupRequired"));
        }
    }

    // No one was welcomed twice; everyone recycled was welcomed or is reported as unsure.
    let mails = env.smtp.as_ref().unwrap().messages();
    let mut to: Vec<String> = mails
        .iter()
        .filter_map(|m| {
            m.lines()
                .find(|l| l.starts_with("To: "))
                .map(|l| l[4..].trim().to_string())
        })
        .collect();
    to.sort();
    let distinct: BTreeSet<&String> = to.iter().collect();
    assert_eq!(distinct.len(), to.len(), "a welcome email went out twice");
    let sent = final_rows
        .iter()
        .filter(|r| r.notes.iter().any(|n| n == "welcome email: sent"))
        .count();
    let unsure = final_rows
        .iter()
        .filter(|r| {
            r.notes
                .iter()
                .any(|n| n.starts_with("welcome email: not re-sent"))
        })
        .count();
    eprintln!(
        "{} welcome emails received, {sent} recorded as sent, {unsure} unsure after a restart",
        to.len()
    );
    assert_eq!(sent + unsure, (FIRST + USERS - RECYCLED_FROM) as usize);
    assert!(to.len() >= sent && to.len() <= sent + unsure, "{to:?}");

    // The retry sends exactly the mails reported unsure, and resets nobody again.
    if unsure > 0 {
        let ha1_before = ha1s(&env).await;
        let patch =
            serde_json::json!({"metadata": {"annotations": {"pbx-operator.io/retry": "1"}}});
        api.patch(
            "reorg",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
        let u = eventually(Duration::from_secs(120), "the retry to finish", || async {
            let u = api.get("reorg").await.ok()?;
            let s = u.status.as_ref()?;
            (s.progress.as_ref()?.run.contains("retry")
                && matches!(
                    s.phase,
                    Phase::Succeeded | Phase::PartiallyFailed | Phase::Failed
                ))
            .then_some(u)
        })
        .await;
        assert_eq!(u.status.unwrap().phase, Phase::Succeeded);
        let mut after: BTreeMap<String, u32> = BTreeMap::new();
        for m in env.smtp.as_ref().unwrap().messages() {
            if let Some(l) = m.lines().find(|l| l.starts_with("To: ")) {
                *after.entry(l[4..].trim().to_string()).or_default() += 1;
            }
        }
        assert_eq!(
            after.len(),
            (FIRST + USERS - RECYCLED_FROM) as usize,
            "everyone welcomed"
        );
        assert!(after.values().all(|n| *n <= 2), "{after:?}");
        assert!(
            after.values().filter(|n| **n == 2).count() <= unsure,
            "only an unsure mail can have gone out twice"
        );
        assert_eq!(ha1s(&env).await, ha1_before, "the retry reset nobody again");
    }
}
